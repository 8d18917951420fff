"""Page recycling for models whose every layer attends over a sliding window (Mistral-style):
a request's pages that lie wholly before the window of every query it has left to run are freed
back to the pool, so a long conversation holds pages for about one window, not its history.

The scheduler (lmsys.serve.scheduler) keeps a request's page list indexed by page number
(position // page_size); a freed page's entry becomes None. Its page-table slot then holds the
request's first live page as filler: the paged decode kernel never reads pages wholly before a
row's window, and the gather paths mask those positions out by the window, so the filler is never
seen. Only models with no global layer qualify (`recycling_window`): a global layer reads the
whole history.
"""

from __future__ import annotations

import math


def recycling_window(model) -> int:
    """The window every layer of `model` (a ModelConfig) attends over, or 0 when some layer
    attends globally (then no page can be freed before its request ends)."""
    return model.sliding_window if model.sliding_window and not model.global_every else 0


def free_before_window(pages: list, num_computed: int, window: int, page_size: int) -> list[int]:
    """Replaces by None (in place) the entries of `pages` wholly before the window of the next
    query (at position `num_computed`: it sees positions > num_computed - window, and later
    queries see less), and returns the page ids freed."""
    first_live = max(0, num_computed - window + 1) // page_size
    freed = [p for p in pages[:first_live] if p is not None]
    pages[:first_live] = [None] * min(first_live, len(pages))
    return freed


def live_pages(tokens: int, window: int, page_size: int, chunk: int) -> int:
    """Pages one request holds at most with recycling: a call of up to `chunk` new tokens plus
    the window - 1 before them, over at most one more page than they fill; never more than the
    request's `tokens` need."""
    return min(math.ceil(tokens / page_size), math.ceil((window - 1 + chunk) / page_size) + 1)


def table_row(pages: list) -> list[int]:
    """`pages` with freed entries (None) filled by the first live page (never read)."""
    filler = next((p for p in pages if p is not None), 0)
    return [filler if p is None else p for p in pages]
