"""Merge methods as pure tensor functions: one output tensor from its inputs.

Every function takes the tensors of ONE weight (same shape, already in the compute
dtype) and resolved scalar parameters, and returns the merged tensor. No I/O, no Ray.

Numerics follow mergekit 0.1.5 operation by operation for the methods it shares
(linear, task_arithmetic, ties, dare_*, slerp, model_stock, sce/mergekit), so the same
YAML gives the same numbers: linear and slerp work in float32 (float64 for float64
inputs) and round once; the task-arithmetic family, model_stock and sce work in the
compute dtype, as mergekit does. Two deliberate differences, both deterministic:
  * top-k selections (TIES magnitude, SCE variance) break ties at the threshold by
    lower flat index and run in O(n) (`kthvalue`), where mergekit's `argsort`/`topk`
    leave the order among equal values unspecified (and sort in O(n log n)). Equal
    values are rare in float32 but common in bfloat16; `sort=True` calls torch's sort
    as mergekit does, for bit-for-bit parity at mergekit's speed;
  * DARE masks come from numpy's PCG64 seeded per tensor name and input, so the result
    does not depend on order or on how many workers ran (mergekit draws from torch's
    global RNG in execution order, which no other run can reproduce).

This module imports torch and numpy only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision of linear and slerp."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """θ = Σ_k w_k θ_k (/ Σ_k w_k when normalised), accumulated in float32.

    Args:
        tensors: K inputs, each [*shape], in input order (the sum runs in this order).
        weights: K weights.
    """
    first = tensors[0]
    dtype = _work_dtype(first)
    w = torch.tensor([list(weights)], dtype=dtype)  # [1, K], as packed by mergekit
    coef = [c.reshape((1,) + (1,) * first.ndim) for c in w.unbind(1)]
    out = first.unsqueeze(0) * coef[0]  # = 0 + x·w exactly: saves mergekit's zero-filled pass
    for x, c in zip(tensors[1:], coef[1:], strict=True):
        out.addcmul_(x.unsqueeze(0), c)
    if normalize:
        out.div_(w.sum(dim=1).reshape((1,) + (1,) * first.ndim))
    return out[0].to(first.dtype)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text: equal on every machine and process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def top_k_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries of a 1-D score; ties at the cut → lower index first.

    O(n) (`kthvalue`), deterministic, independent of thread count.
    """
    n = score.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = torch.kthvalue(score, n - k + 1).values
    mask = score > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = (score == threshold).nonzero().squeeze(1)[:need]
        mask[ties] = True
    return mask


def _rescale_l1(delta: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale `masked` back to the L1 norm of `delta` (mergekit's DARE `rescale`)."""
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sorted_top_k_mask(score: Tensor, k: int) -> Tensor:
    """The k largest by torch's full sort, mergekit's way: the same picks among equal values
    as mergekit 0.1.5 on the same torch build (bit-for-bit parity), at O(n log n)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score, descending=True)[:k]] = True
    return mask


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False, sort: bool = False) -> Tensor:
    """Keep the max(1, ⌊density·n⌋) largest |δ| (TIES trim); the rest become 0.

    sort: pick among equal magnitudes as mergekit does (`sorted_top_k_mask`).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    pick = sorted_top_k_mask if sort else top_k_mask
    mask = pick(delta.abs().reshape(-1).float(), k).to(delta.dtype).reshape(delta.shape)
    masked = delta * mask
    return _rescale_l1(delta, masked) if rescale else masked


def bernoulli_mask(shape: tuple[int, ...], density: float, seed: int) -> Tensor:
    """Bool mask, each element True with probability `density`, from numpy's PCG64 seeded by `seed`.

    Platform- and thread-independent, and faster than `torch.bernoulli` on bfloat16
    (docs/findings.md#dare-masks-numpy-against-torchbernoulli).
    """
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(rng.random(n, dtype=np.float32) < np.float32(density)).reshape(shape)


def random_prune(delta: Tensor, density: float, rescale: bool, seed: int) -> Tensor:
    """DARE: keep each element with probability `density` (Bernoulli), L1-rescaled if asked
    (mergekit's arithmetic: bfloat16 stays bfloat16, other dtypes work in float32)."""
    if density >= 1:
        return delta
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    x = delta.to(work)
    masked = x * bernoulli_mask(tuple(delta.shape), density, seed)
    return (_rescale_l1(x, masked) if rescale else masked).to(delta.dtype)


def sign_consensus(deltas: Tensor) -> Tensor:
    """TIES elect: keep_k = [sign δ_k = sign Σ_k δ_k], with sign 0 of the sum counted as +.

    deltas: [K, *shape] → bool [K, *shape]. A zero δ_k is never kept.
    """
    positive = deltas.sum(dim=0) >= 0
    return torch.where(positive, deltas > 0, deltas < 0)  # = [sign δ == ±1], in one pass


def task_arithmetic_family(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                           densities: Sequence[float], *, sparsify: str | None, consensus: bool,
                           normalize: bool, rescale: bool, lambda_: float = 1.0,
                           seeds: Sequence[int] = (), sort: bool = False) -> Tensor:
    """task_arithmetic / ties / dare_ties / dare_linear (mergekit's generalised task arithmetic).

    δ_k = sparsify(θ_k − θ_p) · w_k; elect signs (consensus); θ = θ_p + λ Σ δ_k / D where
    D = Σ w_k over kept inputs (normalize) or 1. Arithmetic in the compute dtype.

    Args:
        base: θ_p [*shape]; tensors: K inputs [*shape]; weights, densities: K values each.
        sparsify: None, "magnitude" (TIES) or "random" (DARE, needs `seeds`, one per input).
        sort: TIES picks among equal magnitudes as mergekit does (slower, bit-for-bit parity).
    """
    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, x in enumerate(tensors):
        if sparsify is None:
            torch.sub(x, base, out=deltas[i])
            continue
        delta = x - base
        if sparsify == "magnitude":
            delta = magnitude_prune(delta, densities[i], rescale, sort)
        else:
            delta = random_prune(delta, densities[i], rescale, seeds[i])
        deltas[i] = delta
        del delta
    w = torch.tensor(list(weights), dtype=deltas.dtype).reshape((-1,) + (1,) * base.ndim)
    deltas.mul_(w)
    if consensus:
        keep = sign_consensus(deltas)
        mixed = deltas.mul_(keep).sum(dim=0)
        divisor = (w * keep).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


_SLERP_CHUNK = 1024 * 1024


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the whole flattened tensor from v0 (t=0) to v1 (t=1).

    Norms and the dot product run in float32 over chunks of 2^20 elements (mergekit's
    order of summation); |cos| > dot_threshold (near-parallel or antiparallel) falls
    back to linear interpolation. Zero-norm inputs count as norm 1.
    """
    dtype = _work_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=torch.float32).to(dtype)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], _SLERP_CHUNK)
    part = [(a[:, s:s + _SLERP_CHUNK].to(dtype), b[:, s:s + _SLERP_CHUNK].to(dtype)) for s in chunks]
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x, dim=1, keepdim=True)
                                                   for x, _ in part]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y, dim=1, keepdim=True)
                                                   for _, y in part]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True) for x, y in part])
    dot = dot.sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s, (x, y) in zip(chunks, part, strict=True):
        out[:, s:s + _SLERP_CHUNK] = coef_a * x + coef_b * y
    return out.reshape(v0.shape)


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: θ = t·mean_k θ_k + (1−t)·θ_p, t = K cos / (1 + (K−1) cos), cos = mean pairwise
    cosine of the updates (per row when `filter_wise`). A singular denominator keeps θ_p."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    cos = []
    for i, da in enumerate(offsets):
        for db in offsets[i + 1:]:
            norms = torch.norm(da, dim=-1) * torch.norm(db, dim=-1)
            cos.append(((da * db).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (k * cos_theta) / safe)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


def variance_mask(deltas: Tensor, select_topk: float, sort: bool = False) -> Tensor:
    """SCE select: the top ⌊τ·nnz⌋ elements by variance over k (nnz: non-zero variance).

    deltas: [K, *shape] → mask [*shape] in deltas' dtype; ties → lower flat index.
    The variance is computed in float32 (two passes) and rounded to the deltas' dtype;
    sort: mergekit's `torch.var` and `torch.topk` instead (bit-for-bit parity, slower).
    """
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if sort:
        var = torch.var(deltas, dim=0, unbiased=False)
    else:  # one float32 input at a time: memory ≈ 3 tensors, not K
        mean = sum(d.float() for d in deltas) / len(deltas)
        var = (sum((d.float() - mean).square_() for d in deltas) / len(deltas)).to(deltas.dtype)
        del mean
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if not sort:
        return top_k_mask(var.reshape(-1).float(), k).to(deltas.dtype).reshape(var.shape)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sum_squares64(t: Tensor, chunk: int = 1 << 22) -> float:
    """Σ t² accumulated in float64, `chunk` elements at a time (never a float64 copy of `t`)."""
    flat = t.reshape(-1)
    return sum(float(flat[i:i + chunk].double().square().sum()) for i in range(0, flat.numel(), chunk))


def sce_eta(selected: Tensor) -> Tensor:
    """SCE calculate: η_k = Σ(M⊙δ_k)² / Σ_j Σ(M⊙δ_j)² in float64 (K,); uniform iff all are zero."""
    sums = torch.tensor([sum_squares64(d) for d in selected], dtype=torch.float64)
    total = float(sums.sum())
    return torch.full_like(sums, 1 / len(sums)) if total == 0 else sums / total


def sce(base: Tensor, tensors: Sequence[Tensor], select_topk: float = 1.0, variant: str = "mergekit",
        sort: bool = False) -> Tensor:
    """SCE (FuseChat-2): select by variance, calculate η_k ∝ Σ(M⊙δ_k)², erase minority signs, merge.

    variant "fusechat" (the released FuseChat-2.0 code; the pipeline's default): elect and merge
    on the UNMASKED δ; Σ η keep = 0 → 1; arithmetic in float32, rounded once; η from sums of
    squares accumulated in float64, uniform only when every selected update is exactly zero.
    variant "mergekit" (mergekit 0.1.5, bit for bit): δ zeroed outside M before the sign election
    and the merge; Σ η keep clamped at 1e-6; arithmetic in the compute dtype; η uniform whenever
    Σ_k mean((M⊙δ_k)²) < 1e-6, which real fine-tunes fall under (updates of RMS 1e-4 … 6e-4
    give 1e-8 … 4e-7 per target): at real scale this variant merges with η = 1/K everywhere.
    """
    if not tensors:
        return base
    work = base if variant == "mergekit" else base.float()
    deltas = torch.stack([x.to(work.dtype) - work for x in tensors], dim=0)
    mask = variance_mask(deltas, select_topk, sort)
    selected = deltas * mask.unsqueeze(0) if select_topk < 1 else deltas
    if variant == "mergekit":
        eta = selected.square().reshape(len(tensors), -1).mean(dim=1)
        total = float(eta.sum())
        eta = torch.ones_like(eta) / len(tensors) if abs(total) < 1e-6 else eta / total
    else:
        eta = sce_eta(selected).to(work.dtype)
    eta = eta.reshape((-1,) + (1,) * base.ndim)
    merged_on = selected if variant == "mergekit" else deltas
    weights = eta * sign_consensus(merged_on)
    merged = (merged_on * weights).sum(dim=0)
    if variant == "mergekit":
        return work + merged / weights.sum(dim=0).clamp(min=1e-6)
    divisor = weights.sum(dim=0)
    divisor[divisor == 0] = 1
    return (work + merged / divisor).to(base.dtype)


def varm(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """VaRM (FuseChat v1, as the paper intends): θ = Σ_k w_k θ_k with w_k ∝ mean((θ_k − θ_p)²)
    per tensor, normalised over k (all zero → uniform). Float32, rounded once."""
    b = base.float()
    w = torch.stack([(x.float() - b).square().mean() for x in tensors])
    total = float(w.sum())
    w = torch.full_like(w, 1 / len(tensors)) if total == 0 else w / total
    out = torch.zeros_like(b)
    for x, c in zip(tensors, w, strict=True):
        out.add_(x.float() * c)
    return out.to(base.dtype)
