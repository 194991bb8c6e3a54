"""Fused rows → training batches (pure numpy/torch).

A batch pads B rows of `fused/` to the longest (right padding) and concatenates the
teacher entries of their scored positions in row-major order of the loss mask, which
is the order `losses.combined_loss` reads them in:

    input_ids [B, L] · attention_mask [B, L] · loss_mask [B, L-1]
    topk_ids [N, k] · topk_logprobs [N, k] · transferred [N]   (N = loss_mask.sum())

`collate_packed` (`train.packing`) puts several rows one after the other in each of its B rows
and adds `position_ids` [B, L] (0 at each row's first token) and `segment_ids` [B, L] (1, 2, …
per row inside a packed row, 0 on padding), from which `packed_attention_mask` builds the
block-diagonal causal mask: the loss sees the same tokens, scored positions and teacher entries
as `collate` of the same rows, in the same order.
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


def collate_packed(rows: Sequence[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Pack fused rows into rows of up to `max_length` tokens (the keys of `collate`, plus
    `position_ids` and `segment_ids`).

    Which rows share a packed row: each row's `order.PACKED_COLUMN` when it has one (`rank_batches`
    with packing), else next-fit in the given order (`order.pack`). Each row is cut to `max_length`
    as `collate` cuts it. Inside a packed row a row's loss mask is its own, and the position that
    would predict a row's first token from the previous row's last is never scored, so the scored
    positions, in row-major order, are those of `collate` on the same rows: the teacher entries are
    concatenated in that order, and stay aligned with them.
    """
    from fusion_ray.trainer.order import PACKED_COLUMN, pack

    lengths = [min(len(r["input_ids"]), max_length) for r in rows]
    groups = ([int(r[PACKED_COLUMN]) for r in rows] if rows and PACKED_COLUMN in rows[0]
              else pack(np.asarray(lengths), max_length).tolist())
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):  # packed rows in their order; rows inside in the order given
        members.setdefault(g, []).append(i)
    packed = [members[g] for g in sorted(members)]
    totals = [sum(lengths[i] for i in m) for m in packed]
    if max(totals) > max_length:
        raise ValueError(f"a packed row of {max(totals)} tokens exceeds max_length {max_length}")
    width = max(totals)
    ids = np.full((len(packed), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(packed), width), dtype=np.int64)
    mask = np.zeros((len(packed), width - 1), dtype=bool)
    positions = np.zeros((len(packed), width), dtype=np.int64)
    segments = np.zeros((len(packed), width), dtype=np.int64)
    teacher_ids, teacher_lp, reached = [], [], []
    for b, member in enumerate(packed):
        at = 0
        for s, i in enumerate(member, start=1):
            row, n = rows[i], lengths[i]
            ids[b, at:at + n] = row["input_ids"][:n]
            attn[b, at:at + n] = 1
            positions[b, at:at + n] = np.arange(n)
            segments[b, at:at + n] = s
            row_mask = np.asarray(row["loss_mask"], dtype=bool)[: n - 1]
            mask[b, at:at + n - 1] = row_mask  # mask[b, at + n - 1] (the next row's first token) stays False
            kept = int(row_mask.sum())
            teacher_ids.append(np.asarray(row["topk_ids"])[:kept])
            teacher_lp.append(np.asarray(row["topk_logprobs"], dtype=np.float32)[:kept])
            reached.append(np.asarray(row.get("transferred", np.zeros(kept, bool)), dtype=bool)[:kept])
            at += n
        positions[b, at:] = np.arange(width - at)  # the padding: a segment (0) of its own
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
        "loss_mask": torch.from_numpy(mask),
        "topk_ids": torch.from_numpy(np.concatenate(teacher_ids).astype(np.int64)),
        "topk_logprobs": torch.from_numpy(np.concatenate(teacher_lp)),
        "transferred": torch.from_numpy(np.concatenate(reached)),
        "position_ids": torch.from_numpy(positions), "segment_ids": torch.from_numpy(segments),
    }


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive causal mask that keeps each token's attention inside its own segment:
    0 where query i may attend key j (j ≤ i, same segment), the dtype's minimum elsewhere.

    Additive (not boolean) because the eager attention adds the mask to the scores; SDPA takes it
    as is. Padding (segment 0) attends only to padding, so no query row is empty.
    """
    L = segment_ids.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


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
