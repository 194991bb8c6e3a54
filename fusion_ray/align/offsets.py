"""Offset alignment of two tokenizations of the same text: O(n + m), vectorised.

Both tokenizers saw the same characters, so their tokens can be grouped by shared
char boundaries: a group closes wherever both sequences reach the same boundary.
A group of one pivot token and one source token is a *1-1* position (the same
span of text); others are n-m groups. Tokens are given by their char END offsets
(the `offsets` column of `logits/`). Several tokens may end at the same char
(byte-fallback pieces of one character, or a byte-level token that splits a
character): only the last of them closes a boundary.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def closing(ends: np.ndarray) -> np.ndarray:
    """[n] bool: token i ends at a boundary that the next token does not also end at."""
    ends = np.asarray(ends)
    out = np.ones(len(ends), dtype=bool)
    out[:-1] = ends[1:] != ends[:-1]
    return out


def meet(pivot_ends: np.ndarray, source_ends: np.ndarray, text_len: int | None = None) -> bool:
    """True when the two offset sequences can be aligned: monotone, same final boundary."""
    p, s = np.asarray(pivot_ends), np.asarray(source_ends)
    if not len(p) or not len(s) or p[-1] != s[-1] or (text_len is not None and p[-1] != text_len):
        return False
    return bool(np.all(np.diff(p) >= 0) and np.all(np.diff(s) >= 0))


def groups(pivot_ends: np.ndarray, source_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id of every pivot token and every source token (shared-boundary groups).

    Returns:
        (pivot_group [n], source_group [m]), non-decreasing ints starting at 0; tokens
        with the same id form one group.
    """
    p, s = np.asarray(pivot_ends), np.asarray(source_ends)
    shared = np.intersect1d(p[closing(p)], s[closing(s)])  # boundaries both reach
    # token i belongs to the group of the first shared boundary at or after its end
    return np.searchsorted(shared, p, side="left"), np.searchsorted(shared, s, side="left")


@njit(cache=True)
def _walk(p: np.ndarray, s: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    n, m = len(p), len(s)
    out = np.full(n, -1, np.int64)
    i = j = start_i = start_j = 0
    while i < n and j < m:
        while i + 1 < n and p[i + 1] == p[i]:  # only the last token ending here closes
            i += 1
        while j + 1 < m and s[j + 1] == s[j]:
            j += 1
        if p[i] == s[j]:  # a shared boundary closes the group
            if i == start_i and j == start_j:
                out[i] = j
            i, j = i + 1, j + 1
            start_i, start_j = i, j
        elif p[i] < s[j]:
            i += 1
        else:
            j += 1
    return out


def one_to_one(pivot_ends: np.ndarray, source_ends: np.ndarray) -> np.ndarray:
    """[n] for each pivot token, the source token covering exactly the same span, or -1.

    One compiled linear walk over both sequences (the groups of `groups`, without
    materialising them).
    """
    return _walk(np.asarray(pivot_ends, dtype=np.int64), np.asarray(source_ends, dtype=np.int64))


def pivot_to_source(pivot_ends: np.ndarray, source_ends: np.ndarray) -> list[list[int]]:
    """Each pivot token → the sorted source tokens of its group (the DTW output's form)."""
    pg, sg = groups(pivot_ends, source_ends)
    starts = np.searchsorted(sg, pg, side="left")
    stops = np.searchsorted(sg, pg, side="right")
    return [list(range(a, b)) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
