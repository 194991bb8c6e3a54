"""Sequence packing (`train.packing`): the fill order and next-fit packed rows, their positions, masks
and teacher entries, each rank's packed micro-batches, and a loss equal to the unpacked one (value and
gradients) on real tiny HF models."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from fusion_ray import io
from fusion_ray.trainer.batches import collate, collate_packed, packed_attention_mask
from fusion_ray.trainer.losses import batch_loss
from fusion_ray.trainer.order import PACKED_COLUMN, RowPlan, fill_order, pack, rank_batches


def _row(ids, mask, k=2, start=0):
    n = int(np.sum(mask))
    return {"input_ids": np.array(ids), "loss_mask": np.array(mask, dtype=bool),
            "topk_ids": np.arange(start, start + n * k).reshape(n, k),
            "topk_logprobs": np.full((n, k), -1.0, np.float16),
            "transferred": np.arange(n) % 2 == 0}


def test_next_fit_packs_in_order_and_cuts_long_rows_to_the_capacity():
    # capacity 8: 3+4 fit; 2 opens row 1; 9 (cut to 8) cannot join 2: row 2 alone; 12 → row 3;
    # 1 cannot join a full row: row 4, and the last 1 joins it
    assert pack(np.array([3, 4, 2, 9, 12, 1, 1]), 8).tolist() == [0, 0, 1, 2, 3, 4, 4]
    assert pack(np.array([8, 8]), 8).tolist() == [0, 1]
    assert pack(np.array([], dtype=np.int64), 8).tolist() == []


def test_the_fill_order_packs_best_fit_decreasing_and_keeps_the_stream_order_around_it():
    # capacity 10, in stream order [6, 5, 4, 5]: next fit makes [6] [5 4] [5], three packed rows.
    # Best-fit decreasing: 6 opens row A (room 4), 5 opens B (room 5), the second 5 fills B, 4 fills A;
    # A's first row comes first in the stream: A = rows 0, 2, then B = rows 1, 3
    lengths = np.array([6, 5, 4, 5])
    assert pack(lengths, 10).max() + 1 == 3
    order = fill_order(lengths, 10)
    assert order.tolist() == [0, 2, 1, 3]
    assert pack(lengths[order], 10).tolist() == [0, 0, 1, 1]
    # long rows count as the capacity and fill a row alone; best fit takes the tightest room:
    # 9 opens A (room 1), 7 opens B (room 3), 3 fits B exactly (not A), 1 fits A
    lengths = np.array([3, 12, 9, 7, 1])
    order = fill_order(lengths, 10)
    assert order.tolist() == [0, 3, 1, 2, 4]  # B = rows 0, 3 (first row 0), the long row 1, A = rows 2, 4
    assert pack(lengths[order], 10).tolist() == [0, 0, 1, 2, 2]
    assert fill_order(np.array([], dtype=np.int64), 8).tolist() == []


def test_packed_rows_restart_positions_and_never_score_across_a_boundary():
    a = _row([11, 12, 13], [True, True], start=0)  # 3 tokens
    b = _row([21, 22, 23, 24], [False, True, True], start=100)  # 4 tokens
    c = _row([31, 32, 33, 34, 35], [True, False, False, True], start=200)  # 5 tokens
    batch = collate_packed([a, b, c], pad_id=0, max_length=8)  # next fit: [a b] [c]
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24], [31, 32, 33, 34, 35, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]]
    # position 2 would predict b's first token (21) from a's last (13): not scored
    assert batch["loss_mask"].tolist() == [[True, True, False, False, True, True],
                                           [True, False, False, True, False, False]]
    # the teacher entries of the scored positions, row-major: a's 2, b's 2, c's 2
    assert batch["topk_ids"].tolist() == [[0, 1], [2, 3], [100, 101], [102, 103], [200, 201], [202, 203]]
    assert batch["transferred"].tolist() == [True, False, True, False, True, False]
    # every scored (position, target) pair is the one the unpacked batch scores, in the same order
    flat = collate([a, b, c], pad_id=0)

    def scored(bt):
        return list(zip(bt["input_ids"][:, :-1][bt["loss_mask"]].tolist(),
                        bt["input_ids"][:, 1:][bt["loss_mask"]].tolist(), strict=True))

    assert scored(batch) == scored(flat)
    assert torch.equal(batch["topk_ids"], flat["topk_ids"]) and torch.equal(batch["transferred"], flat["transferred"])


def test_the_attention_mask_is_block_diagonal_and_causal():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    got = packed_attention_mask(segments, torch.float32)
    lo = torch.finfo(torch.float32).min
    allowed = [[1, 0, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [0, 0, 1, 0, 0, 0],
               [0, 0, 1, 1, 0, 0],
               [0, 0, 1, 1, 1, 0],
               [0, 0, 0, 0, 0, 1]]  # padding sees only itself
    want = torch.where(torch.tensor(allowed, dtype=torch.bool), 0.0, lo)[None, None]
    assert got.shape == (1, 1, 6, 6) and torch.equal(got, want)
    assert packed_attention_mask(segments, torch.bfloat16).dtype == torch.bfloat16


def test_given_packed_rows_are_kept_and_long_rows_cut_with_their_teacher():
    a = _row([1, 2, 3, 4, 5, 6, 7, 8, 9], [True, True, False, True, True, True, False, True], start=0)
    b = _row([21, 22], [True], start=50)
    c = _row([31, 32, 33], [True, True], start=80)
    # the plan put b and c together (packed row 0) and a, cut to 7 tokens, alone (packed row 1)
    rows = [{**a, PACKED_COLUMN: 1}, {**b, PACKED_COLUMN: 0}, {**c, PACKED_COLUMN: 0}]
    batch = collate_packed(rows, pad_id=0, max_length=7)
    assert batch["input_ids"].tolist() == [[21, 22, 31, 32, 33, 0, 0], [1, 2, 3, 4, 5, 6, 7]]
    assert batch["loss_mask"].tolist() == [[True, False, True, True, False, False],
                                           [True, True, False, True, True, True]]
    # packed row 0's entries (b's, c's), then a's five scored positions inside the cut
    assert batch["topk_ids"].tolist() == [[50, 51], [80, 81], [82, 83], [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="exceeds max_length"):
        collate_packed([{**a, PACKED_COLUMN: 0}, {**b, PACKED_COLUMN: 0}], pad_id=0, max_length=6)


# --- the loss: packed equals unpacked on the same rows -----------------------------------------

def _model(arch: str, vocab: int = 96):
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # absolute position embeddings: the restarting position ids are what keeps them right
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model.float().train()


def _rows(vocab: int, lengths, k: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        mask = rng.random(n - 1) > 0.3
        scored = int(mask.sum())
        probs = np.sort(rng.dirichlet(np.full(vocab, 0.3), scored), axis=-1)[:, ::-1][:, :k]
        rows.append({"input_ids": rng.integers(0, vocab, n), "loss_mask": mask,
                     "topk_ids": rng.integers(0, vocab, (scored, k)),
                     "topk_logprobs": np.log(probs).astype(np.float32),
                     "transferred": rng.random(scored) > 0.4})
    return rows


def _loss(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = batch_loss(model, batch, **kw)
    out["loss"].backward()
    return ({key: value.item() for key, value in out.items()},
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("arch, attn", [("qwen2", "sdpa"), ("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("loss_from, lam, positions", [("logits", 0.4, "transferred"), ("hidden", 0.0, "all")])
def test_packed_loss_equals_the_unpacked_loss_in_value_and_gradients(arch, attn, loss_from, lam, positions):
    model = _model(arch)
    model.set_attn_implementation(attn)
    rows = _rows(model.config.vocab_size, [5, 9, 3, 12, 7, 4, 2])
    kw = {"lam": lam, "tail": "bucket", "temperature": 1.0, "fusion_positions": positions, "loss_from": loss_from}
    want, want_grads = _loss(model, collate(rows, pad_id=0, max_length=16), **kw)
    packed = collate_packed(rows, pad_id=0, max_length=16)
    assert packed["input_ids"].shape[0] == 3 < len(rows)  # [5 9] [3 12] [7 4 2]: conversations do share rows
    got, got_grads = _loss(model, packed, **kw)
    for key in want:  # the CLM and fusion means over the same scored positions
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # control: the same packed rows with one causal attention across the samples is another loss
    crossed = {**packed, "segment_ids": (packed["segment_ids"] > 0).long(),
               "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    leaked, _ = _loss(model, crossed, **kw)
    assert abs(leaked["loss"] - want["loss"]) > 1e-4


# --- each rank's packed micro-batches -----------------------------------------------------------

LENGTHS = [5, 3, 7, 2, 8, 4, 6, 1, 3, 5, 2, 7, 4, 4, 6, 3, 2, 5, 8, 1, 3, 6, 2, 4, 5, 7, 3, 2]


def _fused_shards(tmp_path, sizes) -> str:
    at = 0
    for k, n in enumerate(sizes):
        ids = [list(range(100 * i, 100 * i + LENGTHS[i])) for i in range(at, at + n)]
        io.write_parquet_atomic(str(tmp_path / f"part-{k:05d}.parquet"),
                                pa.table({"sample_id": [f"s{i}" for i in range(at, at + n)], "input_ids": ids}))
        at += n
    return str(tmp_path)


def _filled_stream(plan: RowPlan, epoch: int, capacity: int) -> list[str]:
    """Reference: each window's unpacked stream regrouped by best-fit decreasing, written as a scan."""
    starts = np.cumsum([0, *plan.counts])
    out = []
    for w, files in enumerate(plan.windows(epoch)):
        ids = [f"s{j}" for i in files for j in range(starts[i], starts[i + 1])]
        stream = [ids[k] for k in plan.window_order(epoch, w, len(ids))]
        size = [min(LENGTHS[int(sid[1:])], capacity) for sid in stream]
        bins: list[list] = []  # [room left, stream positions]
        for k in sorted(range(len(stream)), key=lambda k: (-size[k], k)):
            fits = [b for b in bins if b[0] >= size[k]]
            if fits:
                best = min(fits, key=lambda b: (b[0], bins.index(b)))
                best[0] -= size[k]
                best[1].append(k)
            else:
                bins.append([capacity - size[k], [k]])
        for _, members in sorted(bins, key=lambda b: min(b[1])):
            out += [stream[k] for k in sorted(members)]
    return out


def _next_fit(ids: list[str], capacity: int) -> list[list[str]]:
    """Reference: rows joined in order while their (cut) tokens fit."""
    rows, current, used = [], [], 0
    for sid in ids:
        n = min(LENGTHS[int(sid[1:])], capacity)
        if current and used + n > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(sid)
        used += n
    return rows + ([current] if current else [])


@pytest.mark.parametrize("world, micro, capacity, window, shuffle", [(1, 2, 10, 8192, False), (2, 1, 8, 9, True),
                                                                      (2, 2, 12, 5, True), (3, 1, 6, 8192, True)])
def test_each_rank_takes_its_packed_rows_of_every_full_global_micro_batch(tmp_path, world, micro, capacity, window,
                                                                           shuffle):
    plan = RowPlan.of(_fused_shards(tmp_path, [10, 10, 8]), seed=5, shuffle=shuffle, window_rows=window,
                      lengths=True)
    assert plan.lengths.tolist() == LENGTHS
    assert RowPlan.from_wire(plan.to_wire()).lengths.tolist() == LENGTHS
    epoch = 1
    packed = _next_fit(_filled_stream(plan, epoch, capacity), capacity)
    unpacked = _next_fit([s for b in rank_batches(plan, epoch, 1, 0, 1) for s in b.column("sample_id").to_pylist()],
                         capacity)
    assert len(packed) <= len(unpacked)  # the fill order never needs more packed rows here
    assert plan.packed_count(epoch, capacity) == len(packed)
    span = micro * world
    full = len(packed) // span
    for rank in range(world):
        got = []
        for table in rank_batches(plan, epoch, micro, rank, world, capacity):
            slots = table.column(PACKED_COLUMN).to_pylist()
            ids = table.column("sample_id").to_pylist()
            got.append([[s for s, p in zip(ids, slots, strict=True) if p == j] for j in range(micro)])
        want = [[packed[g * span + rank * micro + j] for j in range(micro)] for g in range(full)]
        assert got == want, rank  # the same number of micro-steps on every rank, the tail dropped
    again = [t.column("sample_id").to_pylist() for t in rank_batches(plan, epoch, micro, 0, world, capacity)]
    assert again == [[s for p in mb for s in p] for mb in
                     [[packed[g * span + j] for j in range(micro)] for g in range(full)]]


def test_total_steps_count_the_packed_rows_of_each_epoch(tmp_path):
    from fusion_ray.trainer.loop import total_steps

    plan = RowPlan.of(_fused_shards(tmp_path, [28]), seed=0, shuffle=False, window_rows=8192, lengths=True)
    # unshuffled, one window: LENGTHS (133 tokens) regrouped best-fit decreasing at 16 tokens, then
    # next fit: 8 packed rows, the fewest that hold 133 tokens (next fit in the files' order makes 9)
    packed = _next_fit(_filled_stream(plan, 0, 16), 16)
    assert len(_next_fit([f"s{i}" for i in range(len(LENGTHS))], 16)) == 9
    assert plan.packed_count(0, 16) == plan.packed_count(1, 16) == len(packed) == 8
    cfg = _cfg({"packing": True, "epochs": 2, "global_batch_size": 2, "micro_batch_size": 1})
    assert total_steps(cfg, plan.rows, plan) == 2 * (8 // 2)
    assert total_steps(cfg, plan.rows) == 2 * (28 // 2)  # without the token counts: rows
    capped = _cfg({"packing": True, "max_steps": 3, "global_batch_size": 2, "micro_batch_size": 1})
    assert total_steps(capped, plan.rows, plan) == 3


def _cfg(train: dict):
    from pathlib import Path

    import yaml

    from fusion_ray.config import FusionConfig

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/tiny_cpu.yaml").read_text())
    data["data"]["max_length"] = 16
    data["train"] = {**data["train"], "num_workers": 1, **train}
    return FusionConfig.from_wire(data)  # validated, without the file checks


def test_packing_is_off_by_default_and_off_keeps_the_fingerprint_fields():
    from fusion_ray.trainer.fit import result_fields

    off, on = _cfg({}), _cfg({"packing": True})
    assert off.train.packing is False
    # on: the packing order is named, so a run packed by the earlier next-fit-only order is not resumed
    assert "packing" not in result_fields(off) and result_fields(on)["packing"] == "fill-order"
