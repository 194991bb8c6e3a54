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


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad B preference rows (`dpo_data/`: chosen and rejected tokens with their response masks and
    the reference log-probs) into one batch of 2B sequences, the chosen first:

        input_ids [2B, L] · attention_mask [2B, L] · loss_mask [2B, L-1] · ref_chosen [B] · ref_rejected [B]
    """
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    masks = [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width - 1), dtype=bool)
    for b, (seq, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[b, : len(seq)] = seq
        attn[b, : len(seq)] = 1
        mask[b, : len(seq) - 1] = np.asarray(m, dtype=bool)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
            "loss_mask": torch.from_numpy(mask),
            "ref_chosen": torch.tensor([float(r["ref_chosen"]) for r in rows], dtype=torch.float32),
            "ref_rejected": torch.tensor([float(r["ref_rejected"]) for r in rows], dtype=torch.float32)}
