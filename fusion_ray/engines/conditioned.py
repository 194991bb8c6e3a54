"""The exact conditioned teacher: what a source says where the pivot splits one of its tokens.

Where the pivot's tokenization of a text puts a boundary strictly inside a source token
(source token " computing", pivot " comput" | "ing"), the pivot, at that boundary, has
already written a prefix u of the source token (" comput"). The source's next-token
distribution there is over whole tokens; what it says about how the text goes on after u
is its distribution restricted to the tokens that extend u:

    p(s | u written) = p(s) / M(u),   M(u) = Σ_{s extends u} p(s),

for the tokens s whose surface starts with u and is longer. A top-k row cannot give M(u)
(most of the extenders are outside it, and the written token may be too), so collect
computes it from the full distribution, at exactly these positions: for each (source row
t, prefix u) it stores log M(u) and the top k extenders with their log-probs. Align then
conditions with exact masses: p(s)/M(u) for the stored extenders, the rest of the mass a
tail; nothing is renormalised over a truncated set and the written token gets no more
than the source gives it.

`PrefixIndex` finds the extenders of u by bisection over the sorted surfaces (built once
per tokenizer); `requests` lists the (row, u) pairs of one text; `masses` computes them
from the rows' log-probs. Pure numpy/torch.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np
import torch

_PAST_ANY_BYTE = "\u0100"  # surfaces are latin-1 strings (one char per byte): sorts after any of them


class PrefixIndex:
    """Token surfaces (latin-1 byte strings) in sorted order: the ids of the tokens that
    strictly extend a prefix are one contiguous range of it.

    Args:
        surfaces: surface of every token id (`fusion_ray.align.vocab.surfaces`).
        exclude: ids that never continue a text (special tokens).
    """

    def __init__(self, surfaces: Sequence[str], exclude: Sequence[int] = ()):
        skip = set(exclude)
        keep = [i for i, s in enumerate(surfaces) if s and i not in skip]
        keep.sort(key=lambda i: surfaces[i])
        self.sorted = [surfaces[i] for i in keep]
        self.ids = np.asarray(keep, dtype=np.int64)

    def extenders(self, u: str) -> np.ndarray:
        """Ids whose surface starts with `u` and is longer (for u = "": every token)."""
        lo = bisect_left(self.sorted, u)
        hi = bisect_left(self.sorted, u + _PAST_ANY_BYTE, lo)
        while lo < hi and self.sorted[lo] == u:
            lo += 1
        return self.ids[lo:hi]


def text_bytes(text: str, a: int, b: int) -> str:
    """text[a:b] as a latin-1 string of its UTF-8 bytes (the form of token surfaces)."""
    return text[a:b].encode("utf-8").decode("latin-1")


def requests(text: str, source_ids: Sequence[int], source_ends: np.ndarray, surfaces: Sequence[str],
             pivot_ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The (source row, written prefix) pairs of one text.

    Source token j (j ≥ 1) covers chars [source_ends[j-1], source_ends[j]); it is predicted
    by row t = j - 1. Every pivot boundary c (a pivot token's end) strictly inside it makes
    one request, with u = the text from the token's start to c. Tokens whose surface is not
    the text they cover (special tokens, normalised text) make none, and neither do rows
    not stored (`rows[t] < 0`: positions outside the scored spans when only those are kept).

    Args:
        source_ends, pivot_ends: [T] char end of each token (the `logits/` `offsets` column).
        rows: [T-1] stored row index of each position (-1: not stored).

    Returns:
        (stored rows [n] int64, prefixes [n]) in order of position, then boundary.
    """
    se = np.asarray(source_ends, dtype=np.int64)
    pe = np.asarray(pivot_ends, dtype=np.int64)
    out_rows, prefixes = [], []
    for j in range(1, len(se)):
        b, e = int(se[j - 1]), int(se[j])
        if e - b < 2 or rows[j - 1] < 0:
            continue
        lo, hi = np.searchsorted(pe, b, side="right"), np.searchsorted(pe, e, side="left")
        if lo >= hi:
            continue
        if surfaces[source_ids[j]] != text_bytes(text, b, e):
            continue
        for c in pe[lo:hi].tolist():
            out_rows.append(int(rows[j - 1]))
            prefixes.append(text_bytes(text, b, c))
    return np.asarray(out_rows, dtype=np.int64), prefixes


def masses(logp: torch.Tensor, prefixes: Sequence[str], index: PrefixIndex,
           k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log M(u) and the top-k extenders of u, one request per row of `logp`.

    Args:
        logp: [n, V] log-probs over the full vocabulary (row i answers prefixes[i]).

    Returns:
        (log_mass [n] float32, -inf where nothing extends u; ids [n, k] int32; log-probs
        [n, k] float32, -inf padding where fewer than k tokens extend u).
    """
    n = len(prefixes)
    log_mass = np.full(n, -np.inf, dtype=np.float32)
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    for i, u in enumerate(prefixes):
        ext = index.extenders(u)
        if not len(ext):
            continue
        vals = logp[i].index_select(0, torch.as_tensor(ext, device=logp.device)).double()
        log_mass[i] = float(torch.logsumexp(vals, 0))
        top = vals.topk(min(k, len(ext)))
        ids[i, :len(top.indices)] = ext[top.indices.cpu().numpy()]
        lps[i, :len(top.values)] = top.values.float().cpu().numpy()
    return log_mass, ids, lps
