"""What `lmsys rl` samples from and scores with: prompt sources (a JSONL of prompts, or the built-in
arithmetic task), the reward functions, and the arithmetic task's supervised warm-start rows.

A prompt source gives rows {"prompt": text, **columns} from a position (the run's data_index,
saved in every checkpoint); a reward is called as

    reward(prompts, completions, **columns) -> list[float]

with one entry per completion (each prompt repeated group_size times) and every other column of
the rows as a list aligned with them (e.g. `answer`), as TRL's reward functions are.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from lmsys.config import Config, ConfigError

ARITHMETIC = "arithmetic"
ARITH_CHARS = "0123456789+-*= \n"
ARITH_MAX = 5  # operands of the built-in task: 0 .. ARITH_MAX - 1


def arithmetic_tokenizer():
    """The arithmetic task's character tokenizer: <|endoftext|> (id 0) and one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from lmsys.data.tokenizer import ENDOFTEXT

    vocab = {ENDOFTEXT: 0, **{c: i + 1 for i, c in enumerate(ARITH_CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=ENDOFTEXT))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([ENDOFTEXT])
    return tok


def arithmetic_rows(seed: int, index: int, n: int) -> list[dict]:
    """Rows index .. index + n - 1 of the task's endless stream: {"prompt": "a+b=", "answer"}."""
    rows = []
    for i in range(index, index + n):
        a, b = np.random.default_rng([seed, i]).integers(0, ARITH_MAX, 2)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


class ArithmeticSFT:
    """Supervised rows of the arithmetic task ("a+b=c" then end-of-text, one example per segment,
    positions restarting, loss on every next token of an example) for `lmsys train`'s API: the
    warm start of rl.sft_steps. Drawn from seed + 1, another stream than the RL prompts'."""

    def __init__(self, seed: int, seq_len: int):
        self.tokenizer = arithmetic_tokenizer()
        self.seed, self.seq_len = seed + 1, seq_len

    def batch(self, index: int, batch_size: int, process: int = 0, processes: int = 1) -> dict:
        T = self.seq_len
        out = {k: np.zeros((batch_size, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        out["loss_mask"] = np.zeros((batch_size, T), np.float32)
        per_row = T // 6 + 1
        for r in range(batch_size):
            row = (index + r) * per_row
            t = 0
            for seg, ex in enumerate(arithmetic_rows(self.seed, row, per_row), 1):
                ids = self.tokenizer.encode(ex["prompt"] + ex["answer"]).ids + [0]
                n = min(len(ids) - 1, T - t)
                if n <= 0:
                    break
                out["tokens"][r, t:t + n], out["targets"][r, t:t + n] = ids[:n], ids[1:n + 1]
                out["positions"][r, t:t + n], out["segment_ids"][r, t:t + n] = np.arange(n), seg
                out["loss_mask"][r, t:t + n] = 1
                t += n
        lo, hi = process * batch_size // processes, (process + 1) * batch_size // processes
        return {k: v[lo:hi] for k, v in out.items()}


class PromptSource:
    """Rows of prompts from `data.source`: the arithmetic task, or JSONL files whose
    `rl.prompt_field` column holds the prompt (the rest are the reward's columns), in a seeded
    order per epoch (data.shuffle) or file order."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.arithmetic = cfg.data.source == ARITHMETIC
        self.records: list[dict] = []
        if self.arithmetic:
            return
        field = cfg.rl.prompt_field
        for path in [p.strip() for p in cfg.data.source.split(",") if p.strip()]:
            if not Path(path).is_file():
                raise ConfigError(f"config key 'data.source' = {cfg.data.source!r}: {path} is not a file; give "
                                  f"JSONL files of prompts (or 'arithmetic', the built-in task)")
            for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ConfigError(f"data.source {path} line {n} is not JSON ({e})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                    raise ConfigError(f"data.source {path} line {n} has no text column {field!r} (rl.prompt_field)")
                self.records.append({"prompt": rec[field], **{k: v for k, v in rec.items() if k != field}})
        if not self.records:
            raise ConfigError(f"config key 'data.source' = {cfg.data.source!r}: no prompts in it")

    def check_lengths(self, tokenizer, max_prompt_tokens: int) -> None:
        """Refuses (at start, before any step) a JSONL prompt that is empty or too long."""
        for i, rec in enumerate(self.records, 1):
            n = len(tokenizer.encode(rec["prompt"], add_special_tokens=False).ids)
            if not 0 < n <= max_prompt_tokens:
                raise ConfigError(f"data.source prompt {i} ({rec['prompt'][:60]!r}) is {n} tokens: it must be 1 to "
                                  f"{max_prompt_tokens} (seq_len - rl.max_new_tokens); raise seq_len or drop it")

    def rows(self, index: int, n: int) -> list[dict]:
        if self.arithmetic:
            return arithmetic_rows(self.cfg.seed, index, n)
        N = len(self.records)
        out = []
        for i in range(index, index + n):
            epoch, j = divmod(i, N)
            order = (np.random.default_rng([self.cfg.seed, epoch]).permutation(N) if self.cfg.data.shuffle
                     else range(N))
            out.append(self.records[order[j]])
        return out


# ----------------------------------------------------------------------------- rewards


def _column(columns: dict, name: str, reward: str, n: int) -> list:
    if name not in columns:
        raise ConfigError(f"rl.reward={reward} needs a {name!r} column in every row of data.source; "
                          f"the rows have {sorted(columns) or 'none'}")
    return columns[name]


def exact_match(prompts, completions, **columns) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, equals the row's `answer`."""
    answers = _column(columns, "answer", "exact_match", len(completions))
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def regex_reward(pattern: str):
    """1.0 where the completion matches the row's `pattern` (else rl.reward_pattern) from its start."""
    def regex(prompts, completions, **columns) -> list[float]:
        pats = columns.get("pattern") or [pattern] * len(completions)
        if not all(pats):
            raise ConfigError("rl.reward=regex needs a `pattern` column in data.source or rl.reward_pattern")
        return [float(re.match(p, c, re.DOTALL) is not None) for p, c in zip(pats, completions)]
    return regex


def python_parses(prompts, completions, **columns) -> list[float]:
    """1.0 where the completion (or its first ```python block) is Python that compiles."""
    out = []
    for c in completions:
        m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", c, re.DOTALL)
        try:
            compile(m.group(1) if m else c, "<completion>", "exec")
            out.append(1.0)
        except (SyntaxError, ValueError):
            out.append(0.0)
    return out


def load_reward(cfg: Config):
    """The reward function rl.reward names (a built-in, or module:function importable from the
    working directory or sys.path)."""
    spec = cfg.rl.reward
    if spec == "exact_match":
        return exact_match
    if spec == "regex":
        return regex_reward(cfg.rl.reward_pattern)
    if spec == "python_parses":
        return python_parses
    module, _, name = spec.partition(":")
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"config key 'rl.reward' = {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"config key 'rl.reward' = {spec!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"config key 'rl.reward' = {spec!r}: {name!r} is not callable")
    return fn


def score(reward, spec: str, rows: list[dict], completions: list[str], group_size: int) -> np.ndarray:
    """The rewards of `completions` (group_size per row, in order), checked: one finite number each."""
    prompts = [r["prompt"] for r in rows for _ in range(group_size)]
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    columns = {k: [r.get(k) for r in rows for _ in range(group_size)] for k in keys}
    out = reward(prompts, completions, **columns)
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise ConfigError(f"rl.reward {spec} returned {type(out).__name__}, not a list of numbers") from None
    if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"rl.reward {spec} must return one finite number per completion: got "
                          f"{len(values)} values for {len(completions)} completions ({values[:4]}...)")
    return np.asarray(values, np.float64)
