"""Host-side text streaming: incremental detokenization and stop strings / stop tokens."""

from collections.abc import Iterable

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as context (keeps leading spaces right)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text chunks.

    Decodes a window of tokens (from the last emitted boundary) and diffs it against the text
    the same window gave before. Text ending in U+FFFD (a byte-level token holding part of a
    UTF-8 character) is held back until the character completes.
    """

    def __init__(self, tokenizer, prompt_ids: Iterable[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids or [])
        self.read_offset = len(self.ids)  # tokens before this are emitted
        self.prefix_offset = max(self.read_offset - PROMPT_CONTEXT_TOKENS, 0)  # window start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Adds one generated token; returns the newly completed text (may be "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an incomplete UTF-8 sequence)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]


class StopChecker:
    """Applies OpenAI stop semantics to streamed text.

    `add` returns only text that can never become part of a stop string: a tail that could
    start a stop string is held back until it is resolved. On a stop string, the text before it
    is returned and the stop string itself is dropped; a stop token id ends generation and
    contributes no text. After a stop, `stopped` is True and `matched` is the stop string or
    token id that matched (the engine turns that into finish_reason "stop").

    Per token: `add(token_id, text)`. At the end without a stop, `flush()` releases the rest.
    """

    def __init__(self, stop_strings: Iterable[str] = (), stop_token_ids: Iterable[int] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_token_ids = set(stop_token_ids)
        self.stopped = False
        self.matched: str | int | None = None
        self._held = ""

    def add(self, token_id: int, text: str) -> str:
        """Feeds one generated token and its new text; returns the text safe to emit now."""
        if self.stopped:
            return ""
        if token_id in self.stop_token_ids:
            self.stopped, self.matched = True, token_id
            return self.flush()
        buffer = self._held + text
        hits = [(buffer.find(s), i) for i, s in enumerate(self.stop_strings) if s in buffer]
        if hits:
            position, index = min(hits)  # earliest in the text; first listed on a tie
            self.stopped, self.matched, self._held = True, self.stop_strings[index], ""
            return buffer[:position]
        hold = max((self._partial_match(buffer, s) for s in self.stop_strings), default=0)
        self._held = buffer[len(buffer) - hold:]
        return buffer[:len(buffer) - hold]

    def flush(self) -> str:
        """Releases held-back text: after a stop token, or at the end without a stop ("length")."""
        text, self._held = self._held, ""
        return text

    @staticmethod
    def _partial_match(text: str, stop: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0
