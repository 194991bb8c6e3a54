"""Fusion functions: reference AvgCE weights, MinCE ties, metrics, sparse mixing."""

import math

import numpy as np
import pytest

from fusion_ray import distributions
from fusion_ray.fuse import strategies


def test_avg_ce_weights_match_the_reference_numbers():
    w = strategies.avg_ce_weights(np.array([1.2, 1.5, 2.5]))
    assert np.round(w, 3).tolist() == [0.367, 0.339, 0.294]


def test_min_ce_picks_lowest_and_ties_go_to_the_pivot():
    assert strategies.min_ce_weights(np.array([1.3, 1.1, 1.2])).tolist() == [0, 1, 0]
    assert strategies.min_ce_weights(np.array([1.0, 1.0, 1.5])).tolist() == [1, 0, 0]


def test_no_bf16_ties_between_close_scores():
    """The reference compares in bf16 and ties 1.000 with 1.003; we do not."""
    import torch

    assert torch.tensor(1.0, dtype=torch.bfloat16) == torch.tensor(1.003, dtype=torch.bfloat16)
    assert strategies.min_ce_weights(np.array([1.003, 1.0])).tolist() == [0, 1]


def test_scores_ce_and_bpb():
    assert distributions.score(12.0, 10, 30, "ce") == pytest.approx(1.2)
    assert distributions.score(12.0, 10, 30, "bpb") == pytest.approx(12.0 / 30 / math.log(2))


def test_mix_is_the_weighted_union():
    ids = [np.array([[1, 2]]), np.array([[2, 3]])]
    lp = [np.log(np.array([[0.6, 0.3]])), np.log(np.array([[0.5, 0.4]]))]
    out_ids, out_lp = strategies.mix(ids, lp, np.array([0.5, 0.5]), k=3)
    got = dict(zip(out_ids[0].tolist(), np.exp(out_lp[0]).tolist()))
    assert got == pytest.approx({2: 0.4, 1: 0.3, 3: 0.2})
    only, _ = strategies.mix(ids, lp, np.array([0.0, 1.0]), k=2)
    assert only.tolist() == [[2, 3]]


def test_per_token_scores_favour_the_finer_tokenizer_and_the_default_the_better_model():
    """The case a real chat model showed (SmolLM2-135M-Instruct as pivot, 4.2 bytes a token and
    1.250 bits per byte on English, against a source with a finer tokenizer, 2.9 bytes a token,
    that is worse on the same text, 1.706 bits per byte): per token the source looks better and
    MinCE routes to it; per byte, the unit every tokenizer shares and the default, the pivot wins."""
    from fusion_ray.config import FuseConfig
    from fusion_ray.fuse.stage import candidate_scores

    n_bytes = 4200
    pivot_tokens, source_tokens = round(n_bytes / 4.2), round(n_bytes / 2.9)
    pivot_nll, source_nll = 1.250 * math.log(2) * n_bytes, 1.706 * math.log(2) * n_bytes
    pivot = {"nll_sum": pivot_nll, "loss_mask": [True] * pivot_tokens, "n_bytes": n_bytes}
    source = {"source_ce": distributions.score(source_nll, source_tokens, n_bytes, "ce"),
              "source_bpb": distributions.score(source_nll, source_tokens, n_bytes, "bpb")}
    per_token = candidate_scores(pivot, [source], "ce")
    per_byte = candidate_scores(pivot, [source], "bpb")
    assert per_token[1] < per_token[0], "per token, the worse model looks better"
    assert per_byte == pytest.approx([1.250, 1.706])
    assert strategies.STRATEGIES["min_ce"](per_token).tolist() == [0.0, 1.0]
    assert strategies.STRATEGIES["min_ce"](per_byte).tolist() == [1.0, 0.0]
    default = FuseConfig()
    chosen = strategies.STRATEGIES[default.strategy](candidate_scores(pivot, [source], default.metric))
    assert chosen.tolist() == [1.0, 0.0], "the default routes to the model that predicts the text better"
