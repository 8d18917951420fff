"""Pairwise (all-pairs) test cases: a few cases in which every pair of values of any two factors
occurs at least once, for kernels whose full grid of cases is too large to run by default.

    FACTORS = {"batch": (1, 2, 3), "causal": (True, False), ...}
    cases = pairwise(FACTORS, valid=lambda c: ...)   # [{"batch": 1, "causal": True, ...}, ...]

`valid` rules out impossible combinations (e.g. kv_heads must divide heads); a pair that no
valid case contains is not required. Deterministic: the same factors give the same cases.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable


def full_grid(factors: dict[str, tuple], valid: Callable[[dict], bool] = lambda case: True
              ) -> list[dict]:
    """Every valid combination of the factors' values, in itertools.product order."""
    names = list(factors)
    cases = (dict(zip(names, values)) for values in itertools.product(*factors.values()))
    return [case for case in cases if valid(case)]


def pairwise(factors: dict[str, tuple], valid: Callable[[dict], bool] = lambda case: True
             ) -> list[dict]:
    """A covering set of valid cases, built greedily: each step adds the valid case (first in
    grid order on ties) that covers the most pairs not covered yet."""
    names = list(factors)
    index = {(name, i): n for n, (name, i) in enumerate(
        (name, i) for name in names for i in range(len(factors[name])))}
    position = {name: {v: i for i, v in enumerate(factors[name])} for name in names}
    width = len(index)

    def mask(case):  # one bit per (value of factor a, value of factor b) pair, a before b
        bits = 0
        for a, b in itertools.combinations(names, 2):
            bits |= 1 << (index[a, position[a][case[a]]] * width + index[b, position[b][case[b]]])
        return bits

    grid = full_grid(factors, valid)
    if not grid:
        raise ValueError(f"pairwise: no combination of {names} is valid")
    masks = [mask(case) for case in grid]
    uncovered = functools.reduce(operator.or_, masks)  # the pairs some valid case has
    chosen = []
    while uncovered:
        best = max(range(len(grid)), key=lambda n: ((masks[n] & uncovered).bit_count(), -n))
        chosen.append(grid[best])
        uncovered &= ~masks[best]
    return chosen


def uncovered_pairs(cases: list[dict], factors: dict[str, tuple],
                    valid: Callable[[dict], bool] = lambda case: True) -> set:
    """The pairs ((factor, value), (factor, value)) that some valid case has and `cases` miss."""
    def pairs(case_list):
        return {((a, c[a]), (b, c[b])) for c in case_list for a, b in itertools.combinations(c, 2)}
    return pairs(full_grid(factors, valid)) - pairs(cases)
