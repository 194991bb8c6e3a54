"""Training losses: CLM plus a SPARSE fusion term against the fused teacher.

L = λ·L_CLM + (1−λ)·L_fuse, both averaged over scored positions.

The teacher at each scored position is k ids with log-probs (padding: -inf) and an
implicit tail mass t = 1 − Σ exp(log-probs). L_fuse is the cross-entropy of the
student against it, computed from a gather of the k teacher ids out of the student's
logits and one logsumexp per position: the student's [N, V] log-softmax is never
stored and no dense [B, L, V] teacher is ever built.

- `tail="bucket"` (default): the tail is one more class, "every other token", whose
  student probability is 1 − Σ_k p_s(id_k): L = −Σ_k q_k log p_s(id_k) − t log p_s(tail).
- `tail="renormalize"` (the reference): q renormalised over the k ids, tail ignored.

Temperature T (Hinton's distillation): it divides the student's logits and re-tempers the
teacher's k ids among themselves (q_k ∝ q_k^(1/T); the bucket keeps the tail mass), and the
fusion term is multiplied by T². Both sides are softened so that the student learns the
teacher's ranking of unlikely tokens without being pulled towards a flatter distribution at
T = 1, where it is used; T² keeps the term's gradient (which shrinks about as 1/T²) at the
scale λ sets. Tempering the teacher alone (the FuseLLM/FuseChat scripts' choice) would train the
student towards the softened teacher itself. T = 1 (the default) is the plain cross-entropy.
"""

from __future__ import annotations

import torch

EPS = 1e-6
CHUNK_BYTES = 16 << 20  # float32 [chunk, V] temporaries per chunk of positions


def _teacher(topk_logprobs: torch.Tensor, tail: str, temperature: float):
    """Teacher probabilities over the k ids (and the tail bucket): ([N, k], [N] or None).

    Temperature re-tempers the k ids among themselves; the bucket keeps its mass t
    (tempering it as if it were one token would inflate a rounding-size tail).
    """
    lp = topk_logprobs.float()
    within = torch.softmax(lp / temperature, dim=-1)
    if tail == "renormalize":
        return within, None
    mass = lp.double().exp().sum(-1).clamp(max=1.0).float()
    return within * mass[:, None], 1 - mass


def fusion_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                tail: str = "bucket", temperature: float = 1.0) -> torch.Tensor:
    """Mean soft-target cross-entropy over N scored positions.

    Args:
        logits: [N, V] student logits at the scored positions.
        topk_ids: [N, k] teacher ids (pivot vocabulary).
        topk_logprobs: [N, k] teacher log-probs over the full vocabulary (-inf = padding).

    Returns:
        scalar loss (0 when N = 0).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)  # [N]
    student = z.gather(-1, topk_ids.long()) - lse[:, None]  # [N, k] log p_s(id)
    q, q_tail = _teacher(topk_logprobs, tail, temperature)
    loss = -(torch.where(q > 0, q * student, torch.zeros_like(student))).sum(-1)
    if q_tail is not None:  # the student's mass on the teacher's real (non-padding) ids
        covered = (student.exp() * torch.isfinite(topk_logprobs)).sum(-1).clamp(max=1 - EPS)
        loss = loss - q_tail * torch.log1p(-covered)
    return loss.mean()


def clm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits: [N, V]; targets: [N]."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), targets.long())


def combined_loss_reference(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                            topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *, lambda_clm: float,
                            tail: str = "bucket", temperature: float = 1.0,
                            fusion_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """λ·CLM + (1−λ)·fusion with plain autograd: [N, V] temporaries, kept as the readable reference."""
    pos_logits = logits[:, :-1][loss_mask]  # [N, V]: only scored positions
    targets = input_ids[:, 1:][loss_mask]
    clm = clm_loss(pos_logits, targets)
    if lambda_clm >= 1.0:
        return {"loss": clm, "clm": clm, "fusion": clm.detach() * 0.0}
    if fusion_mask is not None:
        pos_logits, topk_ids, topk_logprobs = pos_logits[fusion_mask], topk_ids[fusion_mask], topk_logprobs[fusion_mask]
    fuse = fusion_loss(pos_logits, topk_ids, topk_logprobs, tail=tail, temperature=temperature)
    # × T² (Hinton): the soft term's gradient shrinks about as 1/T², so its weight against CLM stays λ's
    return {"loss": lambda_clm * clm + (1 - lambda_clm) * temperature**2 * fuse, "clm": clm, "fusion": fuse}


def _chunk_terms(x: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, lam: float,
                 fw: torch.Tensor, tail: str, temperature: float):
    """Losses (summed over rows) and d(loss)/dx for one chunk of scored rows x [n, V] (float32).

    The CLM term of each row weighs `lam`, its fusion term `fw` [n] (already divided by
    the fusion rows' count relative to all rows; 0 for rows without a fusion term).
    """
    logp = torch.log_softmax(x, dim=-1)
    clm = -logp.gather(-1, target[:, None]).sum()
    grad = logp.exp_().mul_(lam)  # λ·(p − onehot)
    grad.scatter_add_(-1, target[:, None], torch.full_like(target, -lam, dtype=grad.dtype)[:, None])
    if lam >= 1.0:
        return clm, clm * 0.0, grad
    z = x if temperature == 1.0 else x / temperature
    lse = torch.logsumexp(z, dim=-1)
    student = z.gather(-1, ids) - lse[:, None]  # [n, k]
    q, q_tail = _teacher(lp, tail, temperature)
    q = torch.where(q > 0, q, torch.zeros_like(q))
    fuse = -(q * torch.where(q > 0, student, torch.zeros_like(student))).sum(-1)
    on = fw > 0
    p = torch.exp(z - lse[:, None])  # student softmax at temperature T: [n, V]
    coef = q.sum(-1)  # d/dz (−Σ q log p) = Q·p − scatter(q)
    scatter = -q
    if q_tail is not None:  # d/dz (−t·log(1 − c)) = t/(1−c) · (scatter(m·p_k) − c·p)
        pk = student.exp() * torch.isfinite(lp)
        covered = pk.sum(-1)
        inside = covered < 1 - EPS
        fuse = fuse - q_tail * torch.log1p(-covered.clamp(max=1 - EPS))
        w = torch.where(inside, q_tail / (1 - covered).clamp(min=EPS), torch.zeros_like(covered))
        coef = coef - w * covered
        scatter = scatter + w[:, None] * pk
    scale = fw / temperature  # [n]
    grad.add_(p.mul_((coef * scale)[:, None]))
    grad.scatter_add_(-1, ids, scatter * scale[:, None])
    return clm, torch.where(on, fuse, torch.zeros_like(fuse)).sum(), grad


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and its gradient chunk by chunk; backward only scales it.

    Memory: one [chunk, V] set of temporaries, plus the gradient — which, with
    `inplace`, is written over the logits themselves (they are not needed afterwards:
    the output layer's backward needs its input and weight, not its output).
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, ids, lp, lam, fmask, tail, temperature, chunk, inplace):
        flat = logits.view(-1, logits.shape[-1])
        n = rows.numel()
        n_fuse = int(fmask.sum()) if fmask is not None else n
        # per-row fusion weight relative to the 1/n every gradient row gets below
        fw = torch.full((n,), (1 - lam) * temperature**2 * n / max(n_fuse, 1), dtype=torch.float32,
                        device=flat.device)  # × T²: see combined_loss_reference
        if fmask is not None:
            fw = torch.where(fmask, fw, torch.zeros_like(fw))
        grad = flat if inplace else torch.zeros_like(flat)
        if inplace:  # rows that are not scored get no gradient
            keep = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
            keep[rows] = True
            flat[~keep] = 0
        clm = torch.zeros((), dtype=torch.float64, device=flat.device)
        fuse = torch.zeros((), dtype=torch.float64, device=flat.device)
        for lo in range(0, n, chunk):
            idx = rows[lo:lo + chunk]
            c, f, g = _chunk_terms(flat[idx].float(), targets[lo:lo + chunk].long(), ids[lo:lo + chunk].long(),
                                   lp[lo:lo + chunk], lam, fw[lo:lo + chunk], tail, temperature)
            clm += c
            fuse += f
            grad[idx] = g.div_(max(n, 1)).to(grad.dtype)
        clm, fuse = (clm / max(n, 1)).float(), (fuse / max(n_fuse, 1)).float()
        ctx.save_for_backward(grad.view_as(logits))
        ctx.mark_non_differentiable(clm, fuse)
        return lam * clm + (1 - lam) * temperature**2 * fuse if lam < 1.0 else clm.clone(), clm, fuse

    @staticmethod
    def backward(ctx, grad_loss, _clm, _fuse):
        (grad,) = ctx.saved_tensors  # our own buffer, used once: scaled in place (no second [.., V] copy,
        grad.mul_(grad_loss.to(grad.dtype))  # and no host sync to test for 1.0)
        return (grad,) + (None,) * 10


def combined_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *, lambda_clm: float,
                  tail: str = "bucket", temperature: float = 1.0, chunk: int | None = None,
                  inplace: bool = False, fusion_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """λ·CLM + (1−λ)·fusion over the scored positions of a batch, chunked over positions.

    Equal (values and gradients) to `combined_loss_reference`, but never holds more
    than `chunk` rows of [V] temporaries (default: rows worth CHUNK_BYTES): the
    gradient is computed in the forward pass, chunk by chunk. With `inplace=True` it is
    written over `logits` (pass logits that nothing else reads afterwards, like a
    model's fresh output), so the whole loss costs O(chunk·V) memory beyond the logits.

    Args:
        logits: [B, L, V] student logits (position t predicts token t+1).
        input_ids: [B, L] tokens.
        loss_mask: [B, L-1] bool, token t+1 is scored.
        topk_ids, topk_logprobs: [N, k] the teacher at the N scored positions, in
            row-major order of `loss_mask`.
        fusion_mask: [N] bool, the positions that get a fusion term (default: all);
            the fusion term is the mean over them.

    Returns:
        {"loss", "clm", "fusion"} scalars.
    """
    B, L = input_ids.shape
    chunk = chunk or max(16, CHUNK_BYTES // (4 * logits.shape[-1]))
    full = torch.zeros((B, L), dtype=torch.bool, device=loss_mask.device)
    full[:, :-1] = loss_mask
    rows = full.view(-1).nonzero().squeeze(-1)
    targets = input_ids[:, 1:][loss_mask]
    loss, clm, fuse = _ChunkedLoss.apply(logits, rows, targets, topk_ids, topk_logprobs.float(), float(lambda_clm),
                                         fusion_mask, tail, float(temperature), chunk, inplace)
    return {"loss": loss, "clm": clm, "fusion": fuse}


def batch_loss(model, batch: dict[str, torch.Tensor], *, lam: float, tail: str, temperature: float,
               fusion_positions: str) -> dict[str, torch.Tensor]:
    """The training step's forward: the model on a collated batch (`fusion_ray.train.batches`),
    then `combined_loss` with its gradient written over the fresh logits (nothing else reads
    them). `fusion_positions`: "transferred" puts the fusion term only where a source reached."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return combined_loss(logits, batch["input_ids"], batch["loss_mask"], batch["topk_ids"], batch["topk_logprobs"],
                         lambda_clm=lam, tail=tail, temperature=temperature, inplace=True,
                         fusion_mask=batch["transferred"] if fusion_positions == "transferred" else None)
