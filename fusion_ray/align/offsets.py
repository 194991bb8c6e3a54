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


def one_to_one(pivot_ends: np.ndarray, source_ends: np.ndarray) -> np.ndarray:
    """[n] for each pivot token, the source token covering exactly the same span, or -1."""
    pg, sg = groups(pivot_ends, source_ends)
    n_groups = int(max(pg.max(initial=-1), sg.max(initial=-1))) + 1
    p_count = np.bincount(pg, minlength=n_groups)
    s_count = np.bincount(sg, minlength=n_groups)
    s_first = np.full(n_groups, -1)
    s_first[sg[::-1]] = np.arange(len(sg))[::-1]  # first source token of each group
    single = (p_count[pg] == 1) & (s_count[pg] == 1)
    return np.where(single, s_first[pg], -1)


def pivot_to_source(pivot_ends: np.ndarray, source_ends: np.ndarray) -> list[list[int]]:
    """Each pivot token → the sorted source tokens of its group (the DTW output's form)."""
    pg, sg = groups(pivot_ends, source_ends)
    starts = np.searchsorted(sg, pg, side="left")
    stops = np.searchsorted(sg, pg, side="right")
    return [list(range(a, b)) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
