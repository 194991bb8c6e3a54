"""Fusion functions: pick or mix the candidates' distributions per sequence.

Candidates are the pivot's own distribution and each aligned source, in that order.
Each is scored on the gold text: `ce` = mean NLL per scored token in the model's own
tokenization (the reference), or `bpb` = bits per UTF-8 byte (fair across
tokenizers of different granularity). All in float64.

- MinCE: the candidate with the lowest score (ties → the earliest, so the pivot first).
- AvgCE: weights = softmax over rewards exp(−score); q = Σ w_c q_c, kept as the k most
  likely ids of the union (nearly uniform weights, by design of the reference).
"""

from __future__ import annotations

import math

import numpy as np

from fusion_ray.distributions import merge_duplicates


def min_ce_weights(scores: np.ndarray) -> np.ndarray:
    """One-hot on the lowest score; np.argmin takes the first, so ties go to the pivot."""
    w = np.zeros(len(scores))
    w[int(np.argmin(np.asarray(scores, dtype=np.float64)))] = 1.0
    return w


def avg_ce_weights(scores: np.ndarray) -> np.ndarray:
    """softmax(exp(−score)) over candidates."""
    rewards = np.exp(-np.asarray(scores, dtype=np.float64))
    e = np.exp(rewards - rewards.max())
    return e / e.sum()


STRATEGIES = {"min_ce": min_ce_weights, "avg_ce": avg_ce_weights}


def mix(ids: list[np.ndarray], logp: list[np.ndarray], weights: np.ndarray, k: int):
    """Σ_c w_c q_c over sparse candidates, as the k most likely ids of the union.

    Args:
        ids, logp: per candidate, [P, k] arrays over the same P positions.
        weights: [C], summing to 1.

    Returns:
        (ids [P, k] int32, logp [P, k] float32).
    """
    live = [c for c, w in enumerate(weights) if w > 0]
    if len(live) == 1:
        return ids[live[0]].astype(np.int32), logp[live[0]].astype(np.float32)
    all_ids = np.concatenate([ids[c] for c in live], axis=1)
    all_lp = np.concatenate([logp[c].astype(np.float64) + math.log(weights[c]) for c in live], axis=1)
    return merge_duplicates(all_ids, all_lp, k)
