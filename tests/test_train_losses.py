"""Sparse fusion loss: equal to the dense computation when k = V, masked, differentiable."""

import pytest
import torch

from fusion_ray.trainer.losses import clm_loss, combined_loss, combined_loss_reference, fusion_loss


def _dense_ce(logits, teacher_logp, temperature=1.0):
    q = torch.softmax(teacher_logp / temperature, -1)
    return -(q * torch.log_softmax(logits / temperature, -1)).sum(-1).mean()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_dense_when_k_is_the_vocab(tail, temperature):
    torch.manual_seed(0)
    n, v = 7, 11
    logits, teacher = torch.randn(n, v), torch.log_softmax(torch.randn(n, v), -1)
    ids = torch.argsort(teacher, -1, descending=True)  # k = V, shuffled into top-k order
    got = fusion_loss(logits, ids, teacher.gather(-1, ids), tail=tail, temperature=temperature)
    assert got.item() == pytest.approx(_dense_ce(logits, teacher, temperature).item(), rel=1e-5)


def test_bucket_keeps_the_tail_and_renormalize_drops_it():
    torch.manual_seed(1)
    n, v, k = 5, 40, 4
    logits, teacher = torch.randn(n, v), torch.log_softmax(torch.randn(n, v) * 2, -1)
    top = torch.topk(teacher, k)
    bucket = fusion_loss(logits, top.indices, top.values, tail="bucket")
    # dense reference of the bucket: the k ids plus one merged "rest" class
    p = torch.softmax(logits, -1)
    p_top, q_top = p.gather(-1, top.indices), top.values.exp()
    want = -(q_top * p_top.log()).sum(-1) - (1 - q_top.sum(-1)) * (1 - p_top.sum(-1)).log()
    assert bucket.item() == pytest.approx(want.mean().item(), rel=1e-5)
    renorm = fusion_loss(logits, top.indices, top.values, tail="renormalize")
    q = top.values.softmax(-1)
    assert renorm.item() == pytest.approx(-(q * torch.log_softmax(logits, -1).gather(-1, top.indices))
                                          .sum(-1).mean().item(), rel=1e-5)


def test_padding_entries_carry_no_weight():
    torch.manual_seed(2)
    logits = torch.randn(3, 9)
    ids = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]])
    lp = torch.tensor([[-0.5, -1.5, -float("inf")], [-0.1, -float("inf"), -float("inf")], [-1.0, -1.2, -2.0]])
    padded = fusion_loss(logits, ids, lp)
    changed = fusion_loss(logits, torch.where(torch.isinf(lp), 7, ids), lp)
    assert torch.isfinite(padded) and padded.item() == pytest.approx(changed.item(), rel=1e-6)


def test_zero_mask_gives_zero_loss_and_gradients_flow():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 13, requires_grad=True)
    ids = torch.randint(0, 13, (2, 6))
    none = combined_loss(logits, ids, torch.zeros(2, 5, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.long),
                         torch.zeros(0, 3), lambda_clm=0.9)
    assert none["loss"].item() == 0.0
    mask = torch.rand(2, 5) > 0.4
    n = int(mask.sum())
    teacher = torch.log_softmax(torch.randn(n, 13), -1).topk(3)
    out = combined_loss(logits, ids, mask, teacher.indices, teacher.values, lambda_clm=0.9)
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert logits.grad[:, -1].abs().sum() == 0, "the last position predicts nothing"


def test_lambda_one_is_plain_clm():
    torch.manual_seed(4)
    logits, ids = torch.randn(2, 6, 13), torch.randint(0, 13, (2, 6))
    mask = torch.ones(2, 5, dtype=torch.bool)
    teacher = torch.log_softmax(torch.randn(10, 13), -1).topk(3)
    out = combined_loss(logits, ids, mask, teacher.indices, teacher.values, lambda_clm=1.0)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert clm_loss(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1)).item() == pytest.approx(want.item())


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature, lam", [(1.0, 0.5), (2.0, 0.8), (0.7, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("chunk, inplace, masked", [(1024, False, False), (3, False, True), (4, True, False),
                                                    (5, True, True)])
def test_chunked_loss_equals_the_reference_in_value_and_gradient(tail, temperature, lam, chunk, inplace, masked):
    torch.manual_seed(5)
    b, length, v, k = 3, 9, 17, 4
    base = torch.randn(b, length, v) * 2
    ids = torch.randint(0, v, (b, length))
    mask = torch.rand(b, length - 1) > 0.3
    n = int(mask.sum())
    teacher = torch.log_softmax(torch.randn(n, v) * 3, -1).topk(k)
    lp = teacher.values.clone()
    lp[::3, -1] = -float("inf")  # padding entries
    lp[1, :] = torch.log(torch.tensor([0.6, 0.3, 0.0999, 0.0001]))  # a tail of ~0: the bucket's clamp
    args = (ids, mask, teacher.indices, lp)
    kw = {"lambda_clm": lam, "tail": tail, "temperature": temperature,
          "fusion_mask": torch.rand(n) > 0.5 if masked else None}
    ref_logits = base.clone().requires_grad_(True)
    want = combined_loss_reference(ref_logits, *args, **kw)
    want["loss"].backward()
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0  # a fresh non-leaf tensor, as a model's output is (in-place needs that)
    got = combined_loss(logits, *args, chunk=chunk, inplace=inplace, **kw)
    (got["loss"] * 2.0).backward()  # the upstream gradient is honoured
    for key in ("loss", "clm", "fusion"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(leaf.grad, 2.0 * ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_temperature_scales_the_fusion_term_by_t_squared():
    """Hinton: at T the loss is λ·CLM + (1−λ)·T²·CE(softened teacher, softened student), so
    the fusion gradient keeps its scale as T grows (without T² it would shrink as 1/T)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 40, requires_grad=True)
    input_ids = torch.randint(0, 40, (1, 6))
    mask = torch.ones(1, 5, dtype=torch.bool)
    teacher = torch.log_softmax(torch.randn(5, 40) * 3, -1)
    ids = teacher.topk(40).indices
    lp = teacher.gather(-1, ids)
    norms = {}
    for t in (1.0, 4.0):
        out = combined_loss(logits, input_ids, mask, ids, lp, lambda_clm=0.0, temperature=t)
        assert out["loss"].item() == pytest.approx(t * t * _dense_ce(logits[0, :5], teacher, t).item(), rel=1e-5)
        (grad,) = torch.autograd.grad(out["loss"], logits)
        norms[t] = grad.norm().item()
    assert 0.3 < norms[4.0] / norms[1.0] < 3  # same order; without T² it is 1/16 of this ratio
