"""Move one source's top-k distributions onto pivot positions and pivot ids.

The distribution at position t predicts token t+1. Pivot position j takes source
position i when pivot token j+1 and source token i+1 are a 1-1 pair (the same span
of text): both models then predict the same text after the same context. The
source's top-k ids go through the vocabulary map; ids mapped to the same pivot id
merge with logsumexp; unmapped ids (-1) are dropped into the tail. Positions with
nothing to transfer get the fallback: the pivot's own distribution (`pivot`) or a
one-hot on the next gold pivot token (`onehot_next`).

Outputs cover the pivot's SCORED positions only (the True entries of its loss
mask), k entries each, padded with probability 0 (log-prob -inf).
"""

from __future__ import annotations

import numpy as np

from fusion_ray.align import offsets as offsets_lib
from fusion_ray.distributions import merge_duplicates, stored_rows


def position_map(one_to_one: np.ndarray) -> np.ndarray:
    """[T_p - 1] source position feeding each pivot position (-1: none) from a token 1-1 map."""
    nxt = one_to_one[1:]
    return np.where(nxt >= 1, nxt - 1, -1)


def one_to_one_from_groups(pivot_to_source: list[list[int]], n_source: int) -> np.ndarray:
    """1-1 pairs from a pivot_to_source mapping (e.g. DTW): pivot j ↔ source i alone."""
    uses = np.zeros(n_source, dtype=np.int64)
    for srcs in pivot_to_source:
        uses[srcs] += 1
    return np.array([s[0] if len(s) == 1 and uses[s[0]] == 1 else -1 for s in pivot_to_source])


def transfer(pivot: dict, source: dict, pos_map: np.ndarray, vmap: np.ndarray, *, k: int,
             fallback: str = "pivot", pivot_scored_only: bool = False,
             source_scored_only: bool = False) -> dict:
    """Aligned distribution of one source over the pivot's scored positions.

    Args:
        pivot, source: `logits/` rows (numpy arrays) of the same sample.
        pos_map: [T_p - 1] source position for each pivot position, -1 where none.
        vmap: [V_source] source id → pivot id (-1: unmapped).

    Returns:
        {"topk_ids" [P, k], "topk_logprobs" [P, k], "transferred" [P]} for the P scored
        pivot positions.
    """
    mask = np.asarray(pivot["loss_mask"], dtype=bool)
    scored = np.flatnonzero(mask)
    src_pos = pos_map[scored]
    src_rows = np.where(src_pos >= 0, stored_rows(np.asarray(source["loss_mask"], bool),
                                                  source_scored_only)[np.maximum(src_pos, 0)], -1)
    ok = src_rows >= 0
    ids = np.zeros((len(scored), k), dtype=np.int64)
    lp = np.full((len(scored), k), -np.inf, dtype=np.float32)
    if ok.any():
        s_ids = np.asarray(source["topk_ids"])[src_rows[ok]]
        s_lp = np.asarray(source["topk_logprobs"], dtype=np.float32)[src_rows[ok]]
        ids[ok], lp[ok] = merge_duplicates(vmap[s_ids], s_lp, k)
    fill_fallback(ids, lp, ~ok, pivot, fallback, pivot_scored_only)
    return {"topk_ids": ids.astype(np.int32), "topk_logprobs": lp, "transferred": ok}


def fill_fallback(ids: np.ndarray, lp: np.ndarray, todo: np.ndarray, pivot: dict, fallback: str,
                  pivot_scored_only: bool) -> None:
    """In place: the scored pivot positions in `todo` get the pivot's own distribution
    (`pivot`) or all mass on the next gold pivot token (`onehot_next`)."""
    if not todo.any():
        return
    mask = np.asarray(pivot["loss_mask"], dtype=bool)
    scored = np.flatnonzero(mask)
    if fallback == "pivot":
        rows = stored_rows(mask, pivot_scored_only)[scored[todo]]
        ids[todo] = np.asarray(pivot["topk_ids"])[rows]
        lp[todo] = np.asarray(pivot["topk_logprobs"], dtype=np.float32)[rows]
    else:
        ids[todo, 0] = np.asarray(pivot["input_ids"])[scored[todo] + 1]
        lp[todo, 0] = 0.0


def align_positions(pivot_ends: np.ndarray, source_ends: np.ndarray, text_len: int,
                    dtw_fallback=None):
    """Position map by offsets, or by DTW when offsets do not meet.

    Args:
        dtw_fallback: a function returning DTW's pivot_to_source for this sample (called
            only when offsets do not meet); None disables the fallback (no transfer).

    Returns:
        (pos_map [T_p - 1], method) with method "offsets", "dtw" or "none".
    """
    if offsets_lib.meet(pivot_ends, source_ends, text_len):
        return position_map(offsets_lib.one_to_one(pivot_ends, source_ends)), "offsets"
    if dtw_fallback is None:
        return np.full(len(pivot_ends) - 1, -1), "none"
    return position_map(one_to_one_from_groups(dtw_fallback(), len(source_ends))), "dtw"
