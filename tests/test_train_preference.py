"""Preference losses (DPO, length-normalised DPO, IPO, SimPO) and chunked sequence log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusion_ray.trainer.preference import preference_loss, sequence_logps


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# two pairs, hand-chosen: policy/ref summed log-probs and token counts
PC, PR, RC, RR = _t(-10.0, -30.0), _t(-12.0, -25.0), _t(-11.0, -29.0), _t(-11.5, -26.0)
LC, LR = _t(5, 20), _t(8, 10)


def _call(kind: str, **kw):
    return preference_loss(PC, PR, RC, RR, LC, LR, kind=kind, **kw)


def test_sigmoid_closed_form():
    beta = 0.1
    # pair 0: h = (-10 + 11) - (-12 + 11.5) = 1.5; pair 1: h = (-30 + 29) - (-25 + 26) = -2
    expected = np.mean([-_logsig(beta * 1.5), -_logsig(beta * -2.0)])
    loss, m = _call("sigmoid", beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(np.mean([0.1 * 1.0, 0.1 * -1.0]), abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(np.mean([0.1 * -0.5, 0.1 * 1.0]), abs=1e-12)
    assert m["rewards/margin"].item() == pytest.approx(np.mean([0.15, -0.2]), abs=1e-12)
    assert m["rewards/accuracy"].item() == 0.5
    assert m["logps/chosen"].item() == -20.0 and m["logps/rejected"].item() == -18.5


def test_sigmoid_label_smoothing_closed_form():
    beta, eps = 0.5, 0.2
    terms = [-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h) for h in (1.5, -2.0)]
    loss, _ = _call("sigmoid", beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(np.mean(terms), abs=1e-12)


def test_length_normalized_closed_form():
    beta = 10.0  # FuseChat-3.0's β for its Llama target
    h0 = (-10 + 11) / 5 - (-12 + 11.5) / 8  # 0.2 + 0.0625
    h1 = (-30 + 29) / 20 - (-25 + 26) / 10  # -0.05 - 0.1
    loss, m = _call("length_normalized", beta=beta)
    assert loss.item() == pytest.approx(np.mean([-_logsig(beta * h0), -_logsig(beta * h1)]), abs=1e-12)
    assert m["rewards/margin"].item() == pytest.approx(beta * (h0 + h1) / 2, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (0.2 + -0.05) / 2, abs=1e-12)


def test_ipo_closed_form():
    beta = 0.25
    h0 = 0.2 + 0.0625
    h1 = -0.05 - 0.1
    loss, _ = _call("ipo", beta=beta)
    assert loss.item() == pytest.approx(np.mean([(h0 - 2.0) ** 2, (h1 - 2.0) ** 2]), abs=1e-12)


def test_simpo_closed_form_reference_free():
    beta, ratio = 2.0, 0.5
    gamma = ratio * beta
    h0 = -10 / 5 - -12 / 8  # -2 + 1.5
    h1 = -30 / 20 - -25 / 10  # -1.5 + 2.5
    expected = np.mean([-_logsig(beta * h0 - gamma), -_logsig(beta * h1 - gamma)])
    loss, m = preference_loss(PC, PR, None, None, LC, LR, kind="simpo", beta=beta, gamma_beta_ratio=ratio)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(beta * (-2.0 + -1.5) / 2, abs=1e-12)
    assert m["rewards/accuracy"].item() == 0.5
    # the reference log-probs, if given, change nothing
    assert _call("simpo", beta=beta, gamma_beta_ratio=ratio)[0].item() == pytest.approx(expected, abs=1e-12)
    eps = 0.1
    z = [beta * h0 - gamma, beta * h1 - gamma]
    smoothed = np.mean([-(1 - eps) * _logsig(v) - eps * _logsig(-v) for v in z])
    loss, _ = preference_loss(PC, PR, None, None, LC, LR, kind="simpo", beta=beta, gamma_beta_ratio=ratio,
                              label_smoothing=eps)
    assert loss.item() == pytest.approx(smoothed, abs=1e-12)


@pytest.mark.parametrize("kind", ["sigmoid", "length_normalized", "ipo", "simpo"])
def test_loss_decreases_when_chosen_logp_rises(kind):
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    loss, _ = preference_loss(pc, pr, RC, RR, LC, LR, kind=kind, beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    with torch.no_grad():
        up, _ = preference_loss(PC + 0.5, PR, RC, RR, LC, LR, kind=kind, beta=0.1)
        down, _ = preference_loss(PC, PR + 0.5, RC, RR, LC, LR, kind=kind, beta=0.1)
    assert up.item() < loss.item() < down.item()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preference loss kind 'dpo'"):
        _call("dpo", beta=0.1)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be"):
            _call("sigmoid", beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
            _call("sigmoid", beta=0.1, label_smoothing=eps)
    with pytest.raises(ValueError, match="does not apply to the 'ipo'"):
        _call("ipo", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs ref_chosen"):
        preference_loss(PC, PR, None, None, kind="sigmoid", beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_len"):
        preference_loss(PC, PR, RC, RR, kind="length_normalized", beta=0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        preference_loss(PC, PR, RC, RR, LC, _t(0, 3), kind="simpo", beta=0.1)
    with pytest.raises(ValueError, match="ref_rejected must be a tensor of shape"):
        preference_loss(PC, PR, RC, _t(1.0), kind="sigmoid", beta=0.1)


def _naive(logits, input_ids, loss_mask):
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * loss_mask).sum(-1), loss_mask.sum(-1)


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_sequence_logps_matches_full_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 9, 50
    logits = torch.randn(B, L, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L - 1, dtype=torch.bool)
    mask[0, 3:] = True  # prompt of 4 tokens, response to the end
    mask[1, 1:5] = True  # prompt of 2 tokens, response, padding
    # row 2: nothing scored
    got, n = sequence_logps(logits, ids, mask, chunk=chunk)
    want, n_want = _naive(logits, ids, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert n.tolist() == n_want.tolist() == [5, 4, 0]
    assert got[2].item() == 0.0

    # the gradient too: chunked backward vs autograd through the full log-softmax
    a = logits.clone().requires_grad_(True)
    b = logits.double().clone().requires_grad_(True)
    w = torch.tensor([1.0, -2.0, 0.5])
    (sequence_logps(a, ids, mask, chunk=chunk)[0] * w).sum().backward()
    (_naive(b, ids, mask)[0] * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=0)


def test_sequence_logps_masks_prompt_tokens():
    B, L, V = 1, 5, 7
    logits = torch.zeros(B, L, V)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[False, False, True, True]])  # tokens 3 and 4 (ids 4, 5) are the response
    # uniform logits: each scored token has log-prob -log V
    got, n = sequence_logps(logits, ids, mask)
    assert got.item() == pytest.approx(-2 * math.log(V), abs=1e-6) and n.item() == 2
    # changing the logits that predict prompt tokens changes nothing; those predicting response tokens do
    logits[0, 0, 2] = logits[0, 1, 3] = 50.0
    assert sequence_logps(logits, ids, mask)[0].item() == pytest.approx(-2 * math.log(V), abs=1e-6)
    logits[0, 2, 4] = 50.0  # position 2 predicts token 3 (id 4): now almost certain
    assert sequence_logps(logits, ids, mask)[0].item() == pytest.approx(-math.log(V), abs=1e-5)
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, L-1\]"):
        sequence_logps(logits, ids, torch.ones(1, 5, dtype=torch.bool))


# ---- oracle: TRL on the same log-probs -------------------------------------------------------------

def _trl_dpo(loss_type: str, beta: float, pc, pr, rc, rr, lc, lr):
    """TRL's DPOTrainer._compute_loss on a fake trainer whose fake model returns given per-token log-probs.

    TRL >= 1.0 computes the DPO loss inside `_compute_loss` (no tensor-level `dpo_loss`): the
    model returns per-token log-probs (its fused LM head), which it sums over the completion,
    and, with `precompute_ref_logps`, reads the reference's sums from the inputs.
    """
    from trl import DPOTrainer

    B = pc.shape[0]
    lens = torch.cat([lc, lr]).long()
    L = int(lens.max()) + 2
    completion_mask = torch.zeros(2 * B, L, dtype=torch.long)
    per_token = torch.zeros(2 * B, L - 1, dtype=torch.float64)
    totals = torch.cat([pc, pr])
    for i in range(2 * B):
        completion_mask[i, 1:1 + lens[i]] = 1
        per_token[i, 0] = totals[i]  # the whole sum on the first completion token: exact
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, L - 1),
                              mean_logits=torch.zeros(2 * B, L - 1),
                              is_top1=torch.zeros(2 * B, L - 1, dtype=torch.bool))
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


def _trl_cpo(loss_type: str, beta: float, chosen, rejected, *, label_smoothing=0.0, simpo_gamma=0.0):
    """TRL's CPOTrainer.cpo_loss (a tensor-level method) on a fake trainer: σ-losses of chosen − rejected."""
    from trl.experimental.cpo import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), loss_type=loss_type,
                           beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    losses, _, _ = CPOTrainer.cpo_loss(fake, chosen, rejected)
    return losses.mean()


def _random_pairs(seed: int, B: int = 6):
    g = torch.Generator().manual_seed(seed)

    def rand(scale: float, normal: bool = False) -> torch.Tensor:
        draw = torch.randn if normal else torch.rand
        return draw(B, generator=g, dtype=torch.float64) * scale

    pc, pr = -rand(80), -rand(80)
    rc, rr = pc + rand(5, normal=True), pr + rand(5, normal=True)
    lc, lr = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_trl(seed):
    pytest.importorskip("trl")
    pc, pr, rc, rr, lc, lr = _random_pairs(seed)
    for ours, theirs, beta in [("sigmoid", "sigmoid", 0.1), ("length_normalized", "sigmoid_norm", 10.0),
                               ("ipo", "ipo", 0.3)]:
        want, trl_metrics = _trl_dpo(theirs, beta, pc, pr, rc, rr, lc, lr)
        got, m = preference_loss(pc, pr, rc, rr, lc, lr, kind=ours, beta=beta)
        assert got.item() == pytest.approx(want.item(), abs=1e-6), ours
        if ours == "sigmoid":  # TRL's metrics are β·(π − ref), the sigmoid kind's
            for key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                                 ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins")]:
                assert m[key].item() == pytest.approx(trl_metrics[trl_key][0], abs=1e-6), key

    # conservative DPO (label smoothing): TRL's DPO `sigmoid` has none, its CPO σ-loss of (πc − rc) − (πr − rr) does
    for eps in (0.0, 0.1, 0.3):
        want = _trl_cpo("sigmoid", 0.2, pc - rc, pr - rr, label_smoothing=eps)
        got, _ = preference_loss(pc, pr, rc, rr, kind="sigmoid", beta=0.2, label_smoothing=eps)
        assert got.item() == pytest.approx(want.item(), abs=1e-6), eps

    # SimPO: TRL's CPO `simpo` on the average log-probs, with its absolute margin γ = gamma_beta_ratio·β
    for beta, ratio, eps in [(2.0, 0.5, 0.0), (2.5, 0.55, 0.0), (10.0, 0.3, 0.1)]:
        want = _trl_cpo("simpo", beta, pc / lc, pr / lr, simpo_gamma=ratio * beta, label_smoothing=eps)
        got, _ = preference_loss(pc, pr, None, None, lc, lr, kind="simpo", beta=beta, gamma_beta_ratio=ratio,
                                 label_smoothing=eps)
        assert got.item() == pytest.approx(want.item(), abs=1e-6), (beta, ratio, eps)


@pytest.mark.parametrize("kind", ["sigmoid", "simpo"])
def test_nll_weight_adds_the_chosen_responses_mean_token_nll(kind):
    beta, alpha = 0.1, 0.7
    plain, _ = _call(kind, beta=beta)
    loss, m = _call(kind, beta=beta, nll_weight=alpha)
    nll = np.mean([10.0 / 5, 30.0 / 20])  # −πc/|c| per pair: 10/5 and 30/20
    assert loss.item() == pytest.approx(plain.item() + alpha * nll, abs=1e-12)
    assert m["nll/chosen"].item() == pytest.approx(nll, abs=1e-12)
    assert "nll/chosen" not in _call(kind, beta=beta)[1]


def test_nll_weight_raises_the_chosen_log_prob_where_plain_dpo_does_not():
    # at policy = reference, plain sigmoid DPO pushes chosen up and rejected down by the same amount;
    # the NLL term adds 1/|c| to the chosen gradient
    pc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-12.0], dtype=torch.float64, requires_grad=True)
    ref_c, ref_r, n = torch.tensor([-10.0], dtype=torch.float64), torch.tensor([-12.0], dtype=torch.float64), _t(4)
    loss, _ = preference_loss(pc, pr, ref_c, ref_r, n, n, kind="sigmoid", beta=1.0, nll_weight=2.0)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.5 - 2.0 / 4, abs=1e-12)  # −β·σ(0) − α/|c|
    assert pr.grad.item() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="nll_weight"):
        preference_loss(pc, pr, ref_c, ref_r, n, n, kind="sigmoid", beta=1.0, nll_weight=-1.0)
    with pytest.raises(ValueError, match="chosen_len"):
        preference_loss(pc, pr, ref_c, ref_r, kind="sigmoid", beta=1.0, nll_weight=1.0)
