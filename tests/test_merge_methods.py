"""Merge methods on small hand-computed tensors and their invariants."""

import pytest
import torch

from fusion_ray.merge import methods as M

A = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
B = torch.tensor([[2.0, 1.0, 0.5], [0.0, -1.0, -4.0]])
ZERO = torch.zeros(2, 3)


def close(x, y, tol=1e-4):
    return torch.allclose(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32), atol=tol)


def test_sce_fusechat_design_vector_all_elements():
    assert close(M.sce(ZERO, [A, B], 1.0, "fusechat"), [[1.5933, -2, 0.5], [0, 3, -2.78]])


def test_sce_fusechat_design_vector_half_selected():
    # variance ties at 2.25 (flat 1 and 5): the lower index wins → M = {1, 4}, η = (.8667, .1333)
    assert close(M.sce(ZERO, [A, B], 0.5, "fusechat"), [[1.1333, -2, 0.5], [0, 3, -1.4]])


def test_sce_mergekit_variant_masks_deltas_first():
    # same M and η, but δ is zeroed outside M before electing signs and merging
    assert close(M.sce(ZERO, [A, B], 0.5, "mergekit"), [[0, -2, 0], [0, 3, 0]])
    assert close(M.sce(ZERO, [A, B], 1.0, "mergekit"), [[1.5933, -2, 0.5], [0, 3, -2.78]])


def test_top_k_mask_breaks_ties_by_lower_index():
    score = torch.tensor([1.0, 3.0, 1.0, 1.0, 0.5])
    assert M.top_k_mask(score, 3).tolist() == [True, True, True, False, False]
    assert M.top_k_mask(score, 0).sum() == 0 and M.top_k_mask(score, 9).all()


def test_ties_sign_election_tie_counts_as_positive():
    base = torch.zeros(3)
    x1, x2 = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])
    out = M.task_arithmetic_family(base, [x1, x2], [1.0, 1.0], [1.0, 1.0], sparsify="magnitude",
                                   consensus=True, normalize=True, rescale=False)
    # element 0: Σδ = 0 → "+" wins, only x1 kept; element 1: "−" wins; element 2: nothing kept → base
    assert out.tolist() == [1.0, -2.0, 0.0]


def test_ties_trim_keeps_largest_magnitudes_lower_index_on_ties():
    delta = torch.tensor([3.0, -1.0, 1.0, 1.0])
    assert M.magnitude_prune(delta, 0.5).tolist() == [3.0, -1.0, 0.0, 0.0]
    assert M.magnitude_prune(delta, 0.1).tolist() == [3.0, 0.0, 0.0, 0.0]  # at least one kept


def test_ties_weights_normalise_over_kept_inputs():
    base = torch.zeros(2)
    out = M.task_arithmetic_family(base, [torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])], [1.0, 3.0],
                                   [1.0, 1.0], sparsify="magnitude", consensus=True, normalize=True, rescale=False)
    assert close(out, [(1 + 9) / 4, -3 / 3])


def test_task_arithmetic_lambda_and_no_normalisation():
    base = torch.ones(2)
    out = M.task_arithmetic_family(base, [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])], [0.5, 0.5],
                                   [1.0, 1.0], sparsify=None, consensus=False, normalize=False, rescale=False,
                                   lambda_=2.0)
    assert close(out, [1 + 2 * 0.5, 1 + 2 * 1.0])


def test_linear_normalises_weights():
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert close(M.linear([x, y], [1.0, 3.0]), [2.5, 5.0])
    assert close(M.linear([x, y], [1.0, 3.0], normalize=False), [10.0, 20.0])


def test_linear_in_bfloat16_rounds_once_from_float32():
    x = torch.tensor([1.0, 1.0078125]).bfloat16()
    y = torch.tensor([1.0078125, 1.0]).bfloat16()
    out = M.linear([x, y], [1.0, 1.0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ((x.float() + y.float()) / 2).bfloat16())


def test_slerp_orthogonal_and_near_parallel_fallback():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(M.slerp(0.5, v0, v1), [0.5**0.5, 0.5**0.5])
    par = torch.tensor([1.0, 2.0, 3.0])
    assert close(M.slerp(0.25, par, 2 * par), 0.75 * par + 0.25 * 2 * par)  # |cos| ≈ 1 → linear
    assert close(M.slerp(0.25, par, -par), 0.75 * par - 0.25 * par)  # antiparallel → linear too


def test_varm_weights_by_mean_squared_update():
    base = torch.zeros(2)
    assert close(M.varm(base, [torch.ones(2), 2 * torch.ones(2)]), [0.2 * 1 + 0.8 * 2] * 2)
    assert close(M.varm(base, [base, base]), base)  # all-zero updates → uniform


def test_model_stock_parallel_updates_give_their_average():
    base = torch.zeros(4)
    d = torch.tensor([1.0, 2.0, -1.0, 0.5])
    assert close(M.model_stock(base, [d, 2 * d]), 1.5 * d)


def test_dare_is_seeded_and_keeps_about_density():
    delta = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    a, b = M.random_prune(delta, 0.3, False, 1), M.random_prune(delta, 0.3, False, 1)
    assert torch.equal(a, b) and not torch.equal(a, M.random_prune(delta, 0.3, False, 2))
    assert abs((a != 0).float().mean().item() - 0.3) < 0.02
    assert M.random_prune(delta.bfloat16(), 0.3, False, 1).dtype == torch.bfloat16
    rescaled = M.random_prune(delta, 0.3, True, 1)
    assert close(rescaled.abs().sum(), delta.abs().sum(), tol=1e-1)  # L1 rescale (mergekit)
    assert M.stable_seed(0, "w", 1) == M.stable_seed(0, "w", 1) != M.stable_seed(0, "w", 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock",
                                  "sce", "sce_fusechat", "varm"])
def test_merging_identical_models_returns_them(name, dtype):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    k = [x.clone() for _ in range(3)]
    out = {
        "linear": lambda: M.linear(k, [0.2, 0.3, 0.5]),
        "task_arithmetic": lambda: M.task_arithmetic_family(x, k, [0.5] * 3, [1] * 3, sparsify=None,
                                                            consensus=False, normalize=False, rescale=False),
        "ties": lambda: M.task_arithmetic_family(x, k, [0.5] * 3, [0.5] * 3, sparsify="magnitude",
                                                 consensus=True, normalize=True, rescale=False),
        "dare_ties": lambda: M.task_arithmetic_family(x, k, [0.5] * 3, [0.5] * 3, sparsify="random",
                                                      consensus=True, normalize=False, rescale=True,
                                                      seeds=[1, 2, 3]),
        "slerp": lambda: M.slerp(0.3, x, k[0]),
        "model_stock": lambda: M.model_stock(x, k[:2]),
        "sce": lambda: M.sce(x, k, 0.5),
        "sce_fusechat": lambda: M.sce(x, k, 0.5, "fusechat"),
        "varm": lambda: M.varm(x, k),
    }[name]()
    assert out.dtype == dtype
    assert torch.allclose(out.float(), x.float(), rtol=1e-6, atol=1e-7)  # float32: up to a rounding step


# --- SCE at the update sizes of real fine-tunes (lr ≈ 5e-6: RMS 1e-4 … 1e-3) --------------------

def sce_reference(base, tensors, select_topk):
    """FuseChat-2's SCE written out plainly in float64 (the `fusechat` variant's rule)."""
    b = base.double()
    d = torch.stack([t.double() - b for t in tensors])
    if select_topk < 1:
        var = d.var(dim=0, unbiased=False).reshape(-1)
        k = int(int((var != 0).sum()) * select_topk)
        order = sorted(range(var.numel()), key=lambda i: (-float(var[i]), i))[:k]
        mask = torch.zeros_like(var)
        mask[order] = 1
        mask = mask.reshape(base.shape)
    else:
        mask = torch.ones_like(b)
    sq = [float((mask * d[j]).pow(2).sum()) for j in range(len(tensors))]
    eta = [1 / len(sq)] * len(sq) if sum(sq) == 0 else [x / sum(sq) for x in sq]
    elected = torch.where(d.sum(0) >= 0, torch.ones_like(b), -torch.ones_like(b))
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for j in range(len(tensors)):
        keep = (torch.sign(d[j]) == elected).double()
        num += eta[j] * keep * d[j]
        den += eta[j] * keep
    den[den == 0] = 1
    return b + num / den, eta


@pytest.mark.parametrize("rms", [[1e-4, 2e-4, 4e-4], [1e-3, 1e-4], [3e-4, 3e-4, 5e-4, 1e-4, 6e-4]])
@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce_fusechat_eta_is_not_uniform_at_real_update_sizes(rms, select_topk):
    g = torch.Generator().manual_seed(len(rms))
    base = torch.randn(48, 40, generator=g) * 0.02
    tensors = [base + torch.randn(48, 40, generator=g) * r for r in rms]
    deltas = torch.stack([t - base for t in tensors])
    want, eta = sce_reference(base, tensors, select_topk)
    got = M.sce(base, tensors, select_topk, "fusechat")
    # float32 output: θ ≈ 0.05 is rounded to ~4e-9; the updates are ~1e-4
    assert torch.allclose(got.double() - base.double(), want - base.double(), rtol=1e-4, atol=1e-8)
    assert torch.allclose(M.sce_eta(deltas * M.variance_mask(deltas, select_topk).unsqueeze(0)),
                          torch.tensor(eta, dtype=torch.float64), rtol=1e-5)
    assert max(eta) / min(eta) > 1.5  # the updates differ in size, so do their weights
    if len(rms) == 3 and select_topk == 1:  # the example in docs/design.md (SCE): (.048, .19, .76)
        assert [round(e, 2) for e in eta] == pytest.approx([0.05, 0.19, 0.76], abs=0.02)


def test_sce_mergekit_variant_collapses_to_uniform_at_real_update_sizes():
    """mergekit 0.1.5's rule, kept bit-compatible: below Σ mean(δ²) = 1e-6, η = 1/K."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 32, generator=g) * 0.02
    small = [base + torch.randn(32, 32, generator=g) * r for r in (1e-4, 4e-4)]
    want, _ = sce_reference(base, small, 1.0)
    got = M.sce(base, small, 1.0, "mergekit")
    d = torch.stack([t - base for t in small])
    keep = M.sign_consensus(d).float()
    by_uniform = base + (d * keep).sum(0) / keep.sum(0).clamp(min=1e-6)
    assert torch.allclose(got, by_uniform, atol=1e-7) and not torch.allclose(got, want.float(), atol=1e-6)


def test_sce_eta_is_uniform_only_when_every_update_is_zero():
    base = torch.zeros(4, 4)
    assert M.sce_eta(torch.zeros(3, 4, 4)).tolist() == [1 / 3] * 3
    tiny = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 1e-30)])
    assert M.sce_eta(tiny).tolist() == [0.0, 1.0]
    assert torch.equal(M.sce(base, [base, base], 1.0, "fusechat"), base)
