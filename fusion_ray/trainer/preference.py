"""Preference losses for the DPO stage of implicit fusion (FuseChat-3.0).

FuseChat-3.0 fine-tunes the target on the best responses of several source models
(SFT), then runs DPO on pairs (best, worst) of one source's samples. This module holds
the two pure pieces of that second step:

- `sequence_logps`: the summed log-probability of a response under a causal LM, from
  its logits. It follows this project's convention (`fusion_ray/trainer/losses.py`):
  `input_ids` [B, L] and `loss_mask` [B, L-1], True where token t+1 is scored, so the
  logits at position t predict token t+1 (Hugging Face's shift). Only one logsumexp
  and one gather per position are kept: no [B, L, V] log-softmax is ever stored, in the
  forward pass nor for the backward, which recomputes the softmax chunk by chunk.
- `preference_loss`: the pairwise loss from four summed log-probs [B] (policy and
  reference, chosen and rejected) and the responses' token counts:

  * "sigmoid" (DPO, Rafailov et al.): h = (πc − rc) − (πr − rr),
    loss = −(1−ε)·logσ(β·h) − ε·logσ(−β·h) (ε: conservative DPO's label smoothing).
  * "length_normalized": the same with every log-prob divided by its response's token
    count, h = (πc − rc)/|c| − (πr − rr)/|r|; FuseChat-3.0 uses it for its Llama-3.1
    target, with β = 10 (TRL calls it "sigmoid_norm").
  * "ipo" (Azar et al.): loss = (h − 1/(2β))² with the length-normalised h, as TRL
    computes it (the IPO authors' normalisation); no label smoothing.
  * "simpo" (Meng et al., reference-free): h = πc/|c| − πr/|r|,
    loss = −(1−ε)·logσ(β·h − γ) − ε·logσ(−(β·h − γ)) with γ = gamma_beta_ratio·β;
    the reference log-probs are not used (None is accepted).

Any kind can add an NLL term on the chosen responses, `nll_weight`·mean(−πc/|c|) (the mean
per-token negative log-likelihood of each chosen response, averaged over pairs): RPO (Pang et
al., "Iterative Reasoning Preference Optimization") and Llama 3's DPO add it so that the chosen
responses' likelihood rises rather than only the margin (TRL's `rpo_alpha` averages over all chosen
tokens of the batch instead of per response). The metrics then include "nll/chosen".

The metrics report the implicit rewards β·score of each kind, where score is the chosen
(rejected) term of h: β·(π − ref) for "sigmoid", β·(π − ref)/len for the normalised
kinds, β·π/len for "simpo"; so that the margin is β·h and the accuracy is the fraction
of pairs with h > 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_BYTES = 16 << 20  # float32 [chunk, V] temporaries per chunk of positions
KINDS = ("sigmoid", "length_normalized", "ipo", "simpo")
_NEEDS_REF = {"sigmoid", "length_normalized", "ipo"}
_NEEDS_LEN = {"length_normalized", "ipo", "simpo"}


class _TokenLogps(torch.autograd.Function):
    """log p(target) at the given rows of the flattened logits; backward recomputes the softmax by chunks."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = rows.numel()
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
        lse = torch.empty(n, dtype=torch.float32, device=flat.device)
        for lo in range(0, n, chunk):
            x = flat[rows[lo:lo + chunk]].float()
            m = torch.logsumexp(x, dim=-1)
            lse[lo:lo + chunk] = m
            out[lo:lo + chunk] = x.gather(-1, targets[lo:lo + chunk, None]).squeeze(-1) - m
        ctx.save_for_backward(flat, rows, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat, rows, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(flat)
        g = grad_out.float()
        for lo in range(0, rows.numel(), ctx.chunk):
            idx = rows[lo:lo + ctx.chunk]
            gc = g[lo:lo + ctx.chunk, None]
            # d log p(t) / dx = onehot(t) − softmax(x)
            d = torch.exp(flat[idx].float() - lse[lo:lo + ctx.chunk, None]).mul_(-gc)
            d.scatter_add_(-1, targets[lo:lo + ctx.chunk, None], gc)
            grad[idx] = d.to(grad.dtype)
        return grad, None, None, None


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, *,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the scored tokens of each sequence.

    Args:
        logits: [B, L, V] causal-LM logits (position t predicts token t+1).
        input_ids: [B, L] tokens (prompt + response, padded).
        loss_mask: [B, L-1] bool, True where token t+1 is a response token (prompt and
            padding False), the convention of `fusion_ray/trainer/losses.py`.
        chunk: positions per chunk (default: CHUNK_BYTES worth of float32 [V] rows).

    Returns:
        (sum_logp [B] float32, differentiable w.r.t. logits; n_tokens [B] int64).
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits must be [B, L, V] and input_ids [B, L]; got {tuple(logits.shape)} "
                         f"and {tuple(input_ids.shape)}")
    B, L, V = logits.shape
    if tuple(loss_mask.shape) != (B, L - 1):
        raise ValueError(f"loss_mask must be [B, L-1] = {(B, L - 1)} (token t+1 is scored); "
                         f"got {tuple(loss_mask.shape)}")
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * max(V, 1)))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mask = loss_mask.bool()
    b, t = mask.nonzero(as_tuple=True)  # row-major: batch, then position
    rows = b * L + t
    targets = input_ids[b, t + 1].long()
    token_logps = _TokenLogps.apply(logits.reshape(B * L, V), rows, targets, chunk)
    total = torch.zeros(B, dtype=torch.float32, device=logits.device).index_add(0, b, token_logps)
    return total, mask.sum(-1)


def _check(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.shape != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} like policy_chosen; got {got}")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                    chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None, *,
                    kind: str, beta: float, label_smoothing: float = 0.0,
                    gamma_beta_ratio: float = 0.5,
                    nll_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean pairwise preference loss over a batch of B pairs (see the module docstring).

    Args:
        policy_chosen, policy_rejected: [B] summed log-probs of the responses under the policy.
        ref_chosen, ref_rejected: [B] the same under the frozen reference (unused by "simpo").
        chosen_len, rejected_len: [B] response token counts (needed by every kind but "sigmoid").
        kind: one of KINDS.
        beta: β > 0.
        label_smoothing: ε in [0, 0.5), the assumed rate of flipped labels (sigmoid kinds and simpo).
        gamma_beta_ratio: SimPO's target margin γ divided by β.
        nll_weight: α ≥ 0 of the chosen responses' NLL term (needs chosen_len when > 0).

    Returns:
        (loss scalar, metrics): metrics are detached scalars "rewards/chosen",
        "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown preference loss kind {kind!r}; expected one of {KINDS}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("label_smoothing does not apply to the 'ipo' loss; leave it at 0")
    if kind == "simpo" and not (isinstance(gamma_beta_ratio, (int, float)) and math.isfinite(gamma_beta_ratio)):
        raise ValueError(f"gamma_beta_ratio must be a finite number, got {gamma_beta_ratio!r}")
    if not isinstance(policy_chosen, torch.Tensor) or policy_chosen.dim() != 1:
        raise ValueError("policy_chosen must be a 1-D tensor [B] of summed log-probs")
    shape = policy_chosen.shape
    _check("policy_rejected", policy_rejected, shape)
    if kind in _NEEDS_REF:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"kind {kind!r} needs ref_chosen and ref_rejected")
        _check("ref_chosen", ref_chosen, shape)
        _check("ref_rejected", ref_rejected, shape)
    if not (isinstance(nll_weight, (int, float)) and math.isfinite(nll_weight) and nll_weight >= 0):
        raise ValueError(f"nll_weight must be a finite number >= 0, got {nll_weight!r}")
    if kind in _NEEDS_LEN or nll_weight:
        if chosen_len is None or rejected_len is None:
            raise ValueError(f"kind {kind!r} needs chosen_len and rejected_len (response token counts)")
        _check("chosen_len", chosen_len, shape)
        _check("rejected_len", rejected_len, shape)
        if bool((chosen_len <= 0).any()) or bool((rejected_len <= 0).any()):
            raise ValueError("chosen_len and rejected_len must be > 0 (a response without tokens)")

    if kind == "simpo":
        chosen = policy_chosen / chosen_len
        rejected = policy_rejected / rejected_len
    else:
        chosen = policy_chosen - ref_chosen
        rejected = policy_rejected - ref_rejected
        if kind in _NEEDS_LEN:
            chosen = chosen / chosen_len
            rejected = rejected / rejected_len
    h = chosen - rejected

    if kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        z = beta * h - (gamma_beta_ratio * beta if kind == "simpo" else 0.0)
        losses = -(1 - label_smoothing) * F.logsigmoid(z)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-z)

    if nll_weight:
        nll = (-policy_chosen / chosen_len).mean()
        losses = losses + nll_weight * nll

    with torch.no_grad():
        rc, rr = beta * chosen.detach(), beta * rejected.detach()
        metrics = {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/margin": (rc - rr).mean(),
            "rewards/accuracy": (rc > rr).float().mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        if nll_weight:
            metrics["nll/chosen"] = nll.detach()
    return losses.mean(), metrics
