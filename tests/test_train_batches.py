"""Batches: padding, masks and the teacher entries line up with the scored positions."""

import numpy as np
import pytest
import torch

from fusion_ray.trainer.batches import collate
from fusion_ray.trainer.losses import combined_loss


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


def _shards(tmp_path, sizes):
    import pyarrow as pa

    from fusion_ray import io

    start = 0
    for k, n in enumerate(sizes):
        io.write_parquet_atomic(str(tmp_path / f"part-{k:05d}.parquet"),
                                pa.table({"sample_id": [f"s{i}" for i in range(start, start + n)]}))
        start += n
    return str(tmp_path)


@pytest.mark.parametrize("world,micro,window", [(1, 4, 8192), (2, 3, 8192), (3, 2, 7), (2, 5, 1)])
def test_each_rank_takes_an_equal_disjoint_share_of_every_full_global_micro_batch(tmp_path, world, micro, window):
    from fusion_ray.trainer.order import RowPlan, rank_batches

    plan = RowPlan.of(_shards(tmp_path, [10, 10, 10, 7]), seed=3, shuffle=True, window_rows=window)
    per_rank = [[b.column("sample_id").to_pylist() for b in rank_batches(plan, 0, micro, r, world)]
                for r in range(world)]
    span = micro * world
    assert all(len(b) == micro for batches in per_rank for b in batches)
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of micro-steps on every rank
    assert len(per_rank[0]) == 37 // span
    rows = [row for batches in per_rank for b in batches for row in b]
    assert len(rows) == len(set(rows)) == 37 // span * span  # disjoint; only the last partial global batch dropped
    # the stream: global micro-batch k is rank 0's k-th micro-batch, then rank 1's, ...
    stream = [row for k in range(len(per_rank[0])) for r in range(world) for row in per_rank[r][k]]
    again = [row for k in range(len(per_rank[0])) for r in range(world)
             for row in list(rank_batches(plan, 0, micro, r, world))[k].column("sample_id").to_pylist()]
    assert stream == again  # the same every time


def test_the_order_is_seeded_per_epoch_mixes_files_and_ignores_the_directory(tmp_path):
    from fusion_ray.trainer.order import RowPlan, rank_batches

    def order(plan, epoch=0):
        return [r for b in rank_batches(plan, epoch, 1, 0, 1) for r in b.column("sample_id").to_pylist()]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = RowPlan.of(_shards(tmp_path / "a", [20, 20]), seed=0, shuffle=True, window_rows=8192)
    b = RowPlan.of(_shards(tmp_path / "b", [20, 20]), seed=0, shuffle=True, window_rows=8192)
    first = order(a)
    assert sorted(first, key=lambda s: int(s[1:])) == [f"s{i}" for i in range(40)]
    assert first == order(b)  # where the files live does not matter, only names, counts and seed
    assert first != order(a, epoch=1) and sorted(order(a, epoch=1)) == sorted(first)  # each epoch reshuffles
    assert first != order(RowPlan.of(a.files[0].rsplit("/", 1)[0], seed=1, shuffle=True, window_rows=8192))
    assert {int(s[1:]) < 20 for s in first[:10]} == {True, False}  # the two files are mixed from the start
    plain = RowPlan.of(str(tmp_path / "a"), seed=0, shuffle=False, window_rows=8192)
    assert order(plain) == [f"s{i}" for i in range(40)]

