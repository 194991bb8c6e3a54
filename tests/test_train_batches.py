"""Batches: padding, masks and the teacher entries line up with the scored positions."""

import numpy as np
import torch

from fusion_ray.train.batches import collate
from fusion_ray.train.losses import combined_loss


def _row(ids, mask, k=2, start=0):
    n = int(np.sum(mask))
    return {"input_ids": np.array(ids), "loss_mask": np.array(mask),
            "topk_ids": np.arange(start, start + n * k).reshape(n, k),
            "topk_logprobs": np.full((n, k), -1.0, np.float16)}


def test_collate_pads_and_orders_teacher_rows():
    a = _row([5, 6, 7, 8], [False, True, True], start=0)
    b = _row([9, 10], [True], start=100)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert batch["topk_ids"].tolist() == [[0, 1], [2, 3], [100, 101]]
    assert batch["topk_logprobs"].dtype == torch.float32


def test_cut_rows_drop_the_teacher_entries_past_the_cut():
    a = _row([1, 2, 3, 4, 5], [True, False, True, True], start=0)
    batch = collate([a], pad_id=0, max_length=3)
    assert batch["loss_mask"].tolist() == [[True, False]]
    assert batch["topk_ids"].tolist() == [[0, 1]]


def test_batch_feeds_the_loss():
    rows = [_row([1, 2, 3, 4], [False, True, True]), _row([3, 2, 1], [True, True])]
    batch = collate(rows, pad_id=0)
    logits = torch.randn(2, 4, 200, requires_grad=True)
    out = combined_loss(logits, batch["input_ids"], batch["loss_mask"], batch["topk_ids"],
                        batch["topk_logprobs"], lambda_clm=0.5)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and logits.grad[1, 2].abs().sum() == 0  # padding: no gradient


def test_each_rank_takes_an_equal_disjoint_slice_of_a_global_batch():
    import pyarrow as pa

    from fusion_ray.train.loop import rank_slice

    batch = pa.table({"sample_id": [f"s{i}" for i in range(7)]})
    slices = [rank_slice(batch, r, 3).column("sample_id").to_pylist() for r in range(3)]
    assert slices == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]  # the remainder (s6) is dropped
    assert rank_slice(pa.table({"sample_id": ["a"]}), 1, 2) is None  # fewer rows than ranks: all skip
    assert rank_slice(batch, 0, 1).num_rows == 7
