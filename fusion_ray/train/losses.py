"""Training losses (DESIGN §6): CLM plus a SPARSE fusion term against the fused teacher.

L = λ·L_CLM + (1−λ)·L_fuse, both averaged over scored positions.

The teacher at each scored position is k ids with log-probs (padding: -inf) and an
implicit tail mass t = 1 − Σ exp(log-probs). L_fuse is the cross-entropy of the
student against it, computed from a gather of the k teacher ids out of the student's
logits and one logsumexp per position: the student's [N, V] log-softmax is never
stored and no dense [B, L, V] teacher is ever built.

- `tail="bucket"` (default): the tail is one more class, "every other token", whose
  student probability is 1 − Σ_k p_s(id_k): L = −Σ_k q_k log p_s(id_k) − t log p_s(tail).
- `tail="renormalize"` (the reference): q renormalised over the k ids, tail ignored.

Temperature T divides the student's logits and re-tempers the teacher's k ids among
themselves (q_k ∝ q_k^(1/T)); the bucket keeps the tail mass.
"""

from __future__ import annotations

import torch

EPS = 1e-6


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


def combined_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *, lambda_clm: float,
                  tail: str = "bucket", temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """λ·CLM + (1−λ)·fusion over the scored positions of a batch.

    Args:
        logits: [B, L, V] student logits (position t predicts token t+1).
        input_ids: [B, L] tokens.
        loss_mask: [B, L-1] bool, token t+1 is scored.
        topk_ids, topk_logprobs: [N, k] the teacher at the N scored positions, in
            row-major order of `loss_mask`.

    Returns:
        {"loss", "clm", "fusion"} scalars.
    """
    pos_logits = logits[:, :-1][loss_mask]  # [N, V]: only scored positions
    targets = input_ids[:, 1:][loss_mask]
    clm = clm_loss(pos_logits, targets)
    if lambda_clm >= 1.0:
        return {"loss": clm, "clm": clm, "fusion": clm.detach() * 0.0}
    fuse = fusion_loss(pos_logits, topk_ids, topk_logprobs, tail=tail, temperature=temperature)
    return {"loss": lambda_clm * clm + (1 - lambda_clm) * fuse, "clm": clm, "fusion": fuse}
