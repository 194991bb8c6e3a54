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
