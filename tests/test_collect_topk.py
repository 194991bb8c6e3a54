"""Collect's pure core: top-k from logits and from vLLM output, masks, bytes, the row table."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from fusion_ray import schema
from fusion_ray.collect.stage import rows_to_table
from fusion_ray.engines import topk


def test_from_logits_matches_a_plain_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(6, 50), [3, 9, 1, 40, 7, 2]
    top_ids, top_lp, gold = topk.from_logits(logits, ids, k=4)
    ref = torch.log_softmax(logits, -1)
    assert top_ids.shape == (5, 4) and top_ids.dtype == np.int32
    for t in range(5):
        order = torch.argsort(ref[t], descending=True)[:4]
        assert top_ids[t].tolist() == order.tolist()
        assert np.allclose(top_lp[t], ref[t][order].numpy(), atol=1e-6)
        assert gold[t] == pytest.approx(ref[t, ids[t + 1]].item(), abs=1e-6)
    assert np.all(np.logaddexp.reduce(top_lp, axis=1) <= 1e-6), "normalised over the full vocab"


def _vllm_entry(logp: torch.Tensor, gold_id: int, k: int) -> dict:
    order = torch.argsort(logp, descending=True)
    entry = {int(i): SimpleNamespace(logprob=float(logp[i]), rank=r + 1) for r, i in enumerate(order[:k])}
    if gold_id not in entry:  # vLLM adds the prompt token with its true rank
        rank = int((order == gold_id).nonzero()) + 1
        entry[gold_id] = SimpleNamespace(logprob=float(logp[gold_id]), rank=rank)
    return entry


def test_from_vllm_equals_from_logits_including_gold_outside_topk():
    torch.manual_seed(1)
    logits, ids = torch.randn(5, 30), [0, 29, 4, 17, 8]
    logp = torch.log_softmax(logits, -1)
    prompt_logprobs = [None] + [_vllm_entry(logp[t], ids[t + 1], 3) for t in range(4)]
    assert any(len(e) == 4 for e in prompt_logprobs[1:]), "the case of k+1 entries is exercised"
    a, b = topk.from_vllm(prompt_logprobs, ids, 3), topk.from_logits(logits, ids, 3)
    assert np.array_equal(a[0], b[0])
    assert np.allclose(a[1], b[1], atol=1e-6) and np.allclose(a[2], b[2], atol=1e-6)


def test_loss_mask_marks_tokens_starting_inside_reply_spans():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 12], [12, 14]])
    mask = topk.loss_mask(offsets, [5], [12])
    assert mask.tolist() == [False, True, True, False]  # tokens 1..4 start at 3, 5, 9, 12


def test_scored_bytes_counts_utf8_once_per_char():
    text = "ab€d"  # € is 3 bytes
    offsets = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [2, 3], [3, 4]])  # byte-fallback: 3 tokens for €
    mask = np.array([False, True, True, True, True])  # token t+1 scored: €, €, €, d
    assert topk.scored_bytes(text, offsets, mask) == 3 + 1
    assert topk.scored_bytes(text, offsets, np.ones(5, bool)) == 1 + 3 + 1
    assert topk.scored_bytes(text, offsets, np.zeros(5, bool)) == 0


def test_rows_to_table_round_trips_the_contract():
    torch.manual_seed(2)
    ids = [5, 1, 7, 3]
    offsets = np.array([[0, 2], [2, 4], [4, 6], [6, 8]])
    scored = topk.from_logits(torch.randn(4, 20), ids, 3)
    full = topk.logits_row("s", "abcdefgh", ids, offsets, [2], [8], scored, scored_only=False)
    only = topk.logits_row("t", "abcdefgh", ids, offsets, [4], [8], scored, scored_only=True)
    table = rows_to_table([full, only])
    assert table.schema.equals(schema.LOGITS)
    rows = table.to_pylist()
    assert len(rows[0]["topk_ids"]) == 3 and len(rows[1]["topk_ids"]) == 2
    assert rows[1]["topk_ids"] == scored[0][1:].tolist()
    assert rows[0]["nll_sum"] == pytest.approx(-float(scored[2].sum()), rel=1e-6)
    assert rows[1]["n_bytes"] == 4
    assert pa.types.is_float16(table.schema.field("topk_logprobs").type.value_type.value_type)
