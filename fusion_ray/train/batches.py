"""Fused rows → training batches (pure numpy/torch).

A batch pads B rows of `fused/` to the longest (right padding) and concatenates the
teacher entries of their scored positions in row-major order of the loss mask, which
is the order `losses.combined_loss` reads them in:

    input_ids [B, L] · attention_mask [B, L] · loss_mask [B, L-1]
    topk_ids [N, k] · topk_logprobs [N, k] · transferred [N]   (N = loss_mask.sum())
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def collate(rows: Sequence[dict], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad and stack fused rows (numpy arrays inside) into one batch.

    Args:
        rows: `fused/` rows with `input_ids` [T], `loss_mask` [T-1], `topk_ids` and
            `topk_logprobs` [P, k] for the P scored positions.
        max_length: cut rows longer than this (their teacher entries are cut to match).
    """
    lengths = [min(len(r["input_ids"]), max_length or len(r["input_ids"])) for r in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width - 1), dtype=bool)
    teacher_ids, teacher_lp, reached = [], [], []
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ids[b, :n] = row["input_ids"][:n]
        attn[b, :n] = 1
        row_mask = np.asarray(row["loss_mask"], dtype=bool)[: n - 1]
        mask[b, : n - 1] = row_mask
        kept = int(row_mask.sum())  # scored positions inside the cut, in order
        teacher_ids.append(np.asarray(row["topk_ids"])[:kept])
        teacher_lp.append(np.asarray(row["topk_logprobs"], dtype=np.float32)[:kept])
        reached.append(np.asarray(row.get("transferred", np.zeros(kept, bool)), dtype=bool)[:kept])
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
        "loss_mask": torch.from_numpy(mask),
        "topk_ids": torch.from_numpy(np.concatenate(teacher_ids).astype(np.int64)),
        "topk_logprobs": torch.from_numpy(np.concatenate(teacher_lp)),
        "transferred": torch.from_numpy(np.concatenate(reached)),  # [N] a source reached it
    }
