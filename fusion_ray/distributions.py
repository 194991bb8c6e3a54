"""Top-k distributions as the stages store and compare them (align writes them, fuse mixes them).

- `merge_duplicates`: a row's equal ids merged with logsumexp, negative ids dropped, the k most
  likely kept;
- `stored_rows`: which row of a `logits/` record's top-k arrays holds each position (records
  written with `collect.scored_only` keep the scored positions only);
- `score`: a candidate's score on one sequence, the unit of the fusion metric (`ce`: mean NLL
  per scored token in the model's own tokenization; `bpb`: bits per UTF-8 byte).
"""

from __future__ import annotations

import math

import numpy as np


def score(nll_sum: float, n_tokens: int, n_bytes: int, metric: str) -> float:
    """A candidate's score on one sequence (lower is better)."""
    if metric == "bpb":
        return nll_sum / max(n_bytes, 1) / math.log(2)
    return nll_sum / max(n_tokens, 1)


def merge_duplicates(ids: np.ndarray, logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge equal ids per row with logsumexp, drop ids < 0, sort by log-prob, keep k.

    Args:
        ids: [P, n] int; logp: [P, n] float (log-probs).

    Returns:
        (ids [P, k] int32, logp [P, k] float32); padding is id 0 with log-prob -inf.
    """
    p, n = ids.shape
    logp = np.where(ids >= 0, logp.astype(np.float32), -np.inf)
    order = np.argsort(ids, axis=1, kind="stable")
    ids_s, lp_s = np.take_along_axis(ids, order, 1), np.take_along_axis(logp, order, 1)
    new_run = np.ones((p, n), dtype=bool)
    new_run[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    run = np.cumsum(new_run, axis=1) - 1
    rows = np.broadcast_to(np.arange(p)[:, None], (p, n))
    merged = np.full((p, n), -np.inf, dtype=np.float32)
    np.logaddexp.at(merged, (rows, run), lp_s)
    merged_ids = np.zeros((p, n), dtype=np.int64)
    merged_ids[rows, run] = ids_s
    top = np.argsort(-merged, axis=1, kind="stable")[:, :k]
    out_lp = np.minimum(np.take_along_axis(merged, top, 1), 0.0)
    out_ids = np.where(np.isfinite(out_lp), np.take_along_axis(merged_ids, top, 1), 0)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)))
        out_lp = np.pad(out_lp, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_ids.astype(np.int32), out_lp.astype(np.float32)


def stored_rows(mask: np.ndarray, scored_only: bool) -> np.ndarray:
    """[T-1] row of each position in a `logits/` row's top-k arrays (-1: not stored)."""
    if not scored_only:
        return np.arange(len(mask))
    out = np.full(len(mask), -1)
    out[mask] = np.arange(int(mask.sum()))
    return out
