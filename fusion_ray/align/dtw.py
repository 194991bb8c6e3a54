"""DTW token alignment with FuseLLM / FuseChat-2 semantics: the fallback for unaligned offsets.

cost(i, j) = Levenshtein distance of source token i and pivot token j with their
space markers (`Ġ`, `▁`) removed; D[0][0] = 0, D[0][*] = D[*][0] = ∞,
D[i+1][j+1] = cost(i, j) + min(D[i][j+1], D[i+1][j], D[i][j]). The path is traced back
from the end; ties go diag > source-step > pivot-step (`fusellm`, FuseLLM / FuseChat v1)
or diag > pivot-step > source-step (`fusechat2`). The cost matrix comes from rapidfuzz
(C); the recurrence and backtrace are compiled with numba. `dtw_align_reference` is
the same algorithm in plain Python: the behaviour the fast one must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numba import njit
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

TieBreak = Literal["fusellm", "fusechat2"]
_TIES = {"fusellm": 0, "fusechat2": 1}


def strip(tokens: Sequence[str], marker: str) -> list[str]:
    return [t.replace(marker, "") for t in tokens] if marker else list(tokens)


@njit(cache=True)
def _dtw(cost: np.ndarray, tie: int):  # pragma: no cover - compiled
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            d[i + 1, j + 1] = cost[i, j] + min(d[i, j + 1], d[i + 1, j], d[i, j])
    src = np.empty(n + m, np.int64)
    piv = np.empty(n + m, np.int64)
    k, i, j = 0, n, m
    while True:
        src[k], piv[k] = i - 1, j - 1
        k += 1
        if i == 1 and j == 1:
            break
        diag, source_step, pivot_step = d[i - 1, j - 1], d[i - 1, j], d[i, j - 1]
        best = min(diag, source_step, pivot_step)
        if diag == best:
            i, j = i - 1, j - 1
        elif tie == 0:
            if source_step == best:
                i -= 1
            else:
                j -= 1
        elif pivot_step == best:
            j -= 1
        else:
            i -= 1
    return d[n, m], src[:k][::-1], piv[:k][::-1]


def _pivot_to_source(src: np.ndarray, piv: np.ndarray, n_pivot: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n_pivot)]
    order = np.lexsort((src, piv))
    for s, p in zip(src[order].tolist(), piv[order].tolist(), strict=True):
        if not out[p] or out[p][-1] != s:
            out[p].append(s)
    return out


def dtw_align(
    source_tokens: Sequence[str], pivot_tokens: Sequence[str], *, source_marker: str = "Ġ",
    pivot_marker: str = "▁", tie_break: TieBreak = "fusechat2", return_cost: bool = False,
):
    """Align two tokenizations of the same text by DTW on token edit distance.

    Args:
        source_tokens: the source tokenizer's token strings (n).
        pivot_tokens: the pivot tokenizer's token strings (m).
        source_marker, pivot_marker: space markers removed before comparing.
        tie_break: "fusellm" (diag > source-step > pivot-step) or "fusechat2"
            (diag > pivot-step > source-step).
        return_cost: also return the total path cost D[n][m].

    Returns:
        pivot_to_source: for each pivot token, the sorted source positions aligned to
        it (and the cost when `return_cost`).
    """
    if not source_tokens or not pivot_tokens:
        raise ValueError("dtw_align needs two non-empty token sequences")
    cost = cdist(strip(source_tokens, source_marker), strip(pivot_tokens, pivot_marker),
                 scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)
    total, src, piv = _dtw(cost, _TIES[tie_break])
    mapping = _pivot_to_source(src, piv, len(pivot_tokens))
    return (mapping, total) if return_cost else mapping


def levenshtein_reference(a: str, b: str) -> int:
    """Plain-Python edit distance (insert, delete, substitute: cost 1 each)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def dtw_align_reference(source_tokens, pivot_tokens, *, source_marker="Ġ", pivot_marker="▁",
                        tie_break: TieBreak = "fusechat2"):
    """The plain-Python DTW, written out plainly (slow; for tests and benchmarks).

    Returns:
        (pivot_to_source, cost).
    """
    s, p = strip(source_tokens, source_marker), strip(pivot_tokens, pivot_marker)
    n, m, inf = len(s), len(p), float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            d[i + 1][j + 1] = levenshtein_reference(s[i], p[j]) + min(d[i][j + 1], d[i + 1][j], d[i][j])
    pairs, i, j = [], n, m
    while True:
        pairs.append((i - 1, j - 1))
        if i == 1 and j == 1:
            break
        steps = {"diag": d[i - 1][j - 1], "source": d[i - 1][j], "pivot": d[i][j - 1]}
        order = ["diag", "source", "pivot"] if tie_break == "fusellm" else ["diag", "pivot", "source"]
        move = min(order, key=lambda name: (steps[name], order.index(name)))
        i, j = (i - 1, j - 1) if move == "diag" else (i - 1, j) if move == "source" else (i, j - 1)
    out: list[list[int]] = [[] for _ in range(m)]
    for si, pj in sorted(pairs, key=lambda x: (x[1], x[0])):
        if si not in out[pj]:
            out[pj].append(si)
    return out, d[n][m]
