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


def _softmax_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite x [n, V] with exp(x − max) (the softmax before its division); return the row sums
    [n, 1] and the logsumexp [n]. No [n, V] temporary: the caller's buffer is the only one."""
    m = x.amax(-1, keepdim=True)
    s = x.sub_(m).exp_().sum(-1, keepdim=True)
    return s, (m + s.log()).squeeze(-1)


def _chunk_terms(x: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, lam: float,
                 fw: torch.Tensor, tail: str, temperature: float):
    """Losses (summed over rows) and d(loss)/dx for one chunk of scored rows x [n, V] (float32).

    The CLM term of each row weighs `lam`, its fusion term `fw` [n] (already divided by
    the fusion rows' count relative to all rows; 0 for rows without a fusion term).

    x must be the caller's own buffer (a fresh copy or matmul output): the gradient is written
    over it, so at T = 1 a chunk costs that one [n, V] buffer and nothing more (a second one,
    the tempered softmax, at T ≠ 1). Everything else is gathered from x first ([n] and [n, k]).
    """
    x_target = x.gather(-1, target[:, None]).squeeze(-1)
    x_ids = x.gather(-1, ids) if lam < 1.0 else None
    y = x / temperature if lam < 1.0 and temperature != 1.0 else None  # [n, V]: the tempered logits
    s, lse = _softmax_(x)  # x: exp(x − max)
    clm = (lse - x_target).sum()
    if lam >= 1.0:  # λ·(p − onehot)
        x.mul_(lam / s)
        x.scatter_add_(-1, target[:, None], torch.full_like(x_target, -lam)[:, None])
        return clm, clm * 0.0, x
    if y is None:
        s_t, lse_t = s, lse
    else:
        s_t, lse_t = _softmax_(y)
    student = x_ids / temperature - lse_t[:, None]  # [n, k] log p_s(id) at T
    q, q_tail = _teacher(lp, tail, temperature)
    q = torch.where(q > 0, q, torch.zeros_like(q))
    fuse = -(q * torch.where(q > 0, student, torch.zeros_like(student))).sum(-1)
    on = fw > 0
    coef = q.sum(-1)  # d/dz (−Σ q log p) = Q·p − scatter(q), p the student softmax at T
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
    if y is None:  # one softmax: λ·p + coef·scale·p in one pass
        x.mul_(((lam + coef * scale) / s.squeeze(-1))[:, None])
    else:
        x.mul_(lam / s)
        x.add_(y.mul_((coef * scale / s_t.squeeze(-1))[:, None]))
    x.scatter_add_(-1, target[:, None], torch.full_like(x_target, -lam)[:, None])
    x.scatter_add_(-1, ids, scatter * scale[:, None])
    return clm, torch.where(on, fuse, torch.zeros_like(fuse)).sum(), x


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


HIDDEN_CHUNK_BYTES = 128 << 20  # the hidden-state path's chunk: larger, it is a matmul's M


def _chunk_values(x: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, lam: float,
                  fw: torch.Tensor, tail: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two losses of `_chunk_terms` (summed over the chunk's rows x [n, V], float32), without the gradient.

    x is the caller's own buffer (the chunk's fresh logits) and is overwritten: gathers of the
    target and the k ids, then one logsumexp in place (at T ≠ 1 a second one, on a tempered copy),
    so no [n, V] temporary beyond x at T = 1.
    """
    x_target = x.gather(-1, target[:, None]).squeeze(-1)
    x_ids = x.gather(-1, ids) if lam < 1.0 else None
    lse_t = torch.logsumexp(x / temperature, dim=-1) if lam < 1.0 and temperature != 1.0 else None
    _, lse = _softmax_(x)
    clm = (lse - x_target).sum()
    if lam >= 1.0:
        return clm, clm * 0.0
    lse_t = lse if lse_t is None else lse_t
    student = x_ids / temperature - lse_t[:, None]  # [n, k] log p_s(id) at T
    q, q_tail = _teacher(lp, tail, temperature)
    q = torch.where(q > 0, q, torch.zeros_like(q))
    fuse = -(q * torch.where(q > 0, student, torch.zeros_like(student))).sum(-1)
    if q_tail is not None:
        covered = (student.exp() * torch.isfinite(lp)).sum(-1)
        fuse = fuse - q_tail * torch.log1p(-covered.clamp(max=1 - EPS))
    return clm, torch.where(fw > 0, fuse, torch.zeros_like(fuse)).sum()


def _head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits [n, V] in float32, computed in the head's dtype as the model's lm_head computes them."""
    return torch.nn.functional.linear(h, weight, bias).float()


def _grad_in_place(weight: torch.Tensor) -> torch.Tensor | None:
    """The head weight's existing float32 `.grad`, when backward may add its gradient into it directly
    instead of building a [V, H] float32 gradient for autograd to add (one [V, H] temporary less:
    501 MiB at V 128k, H 1024); None otherwise.

    Autograd would do exactly this addition itself: with `.grad` defined and no graph being
    built, its AccumulateGrad node runs `grad += new` in place. We do it earlier, chunk by
    chunk, and hand autograd an expanded zero (no memory) for the weight, so its AccumulateGrad
    node still runs and its post-hooks fire after the sum is in `.grad`: DDP's reducer and
    DeepSpeed ZeRO-1/2 read `param.grad` there (tests/test_train_head_grad.py checks both on 2
    gloo ranks). Taken only when that equivalence holds:
    - a float32 leaf that requires grad, with a defined dense float32 `.grad` of its shape on its device
      (not on the first micro-step after `zero_grad(set_to_none=True)`: autograd then keeps our
      [V, H] buffer as `.grad` itself, no temporary; not for bf16 gradients, where adding each
      chunk in bf16 would round more than one float32 sum);
    - no graph being built (`create_graph=True` makes autograd add out of place);
    - no tensor hook on the weight (it would see the zero, not the gradient);
    - the engine will run the weight's AccumulateGrad in this pass (not `torch.autograd.grad`
      asked for other inputs, which must leave `.grad` alone).
    """
    if not weight.is_leaf or not weight.requires_grad or torch.is_grad_enabled():
        return None
    grad = weight.grad
    if (grad is None or weight.dtype != torch.float32 or grad.dtype != torch.float32
            or grad.layout != torch.strided or grad.shape != weight.shape
            or grad.device != weight.device or weight._backward_hooks):
        return None
    will_run = getattr(torch._C, "_will_engine_execute_node", None)  # private: without it, the plain path
    if will_run is None or not hasattr(torch.autograd.graph, "get_gradient_edge"):
        return None
    return grad if will_run(torch.autograd.graph.get_gradient_edge(weight).node) else None


class _HiddenChunkedLoss(torch.autograd.Function):
    """λ·CLM + (1−λ)·fusion from the final hidden states and the LM head, chunk by chunk of positions.

    Forward: each chunk's logits are computed, reduced to its losses and dropped. Backward:
    each chunk's logits are computed again, turned into d(loss)/d(logits) (`_chunk_terms`)
    and pushed through the head: d/dh = g·W for the chunk's rows, d/dW += gᵀ·h (and
    d/db += Σ g), accumulated in float32. Neither [N, V] logits nor their gradient ever
    exist; the cost is one more head matmul per chunk (the recomputation).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, ids, lp, lam, fmask, tail, temperature, chunk):
        flat = hidden.reshape(-1, hidden.shape[-1])
        n = rows.numel()
        n_fuse = int(fmask.sum()) if fmask is not None else n
        fw = torch.full((n,), (1 - lam) * temperature**2 * n / max(n_fuse, 1), dtype=torch.float32,
                        device=flat.device)  # as in _ChunkedLoss: × T², relative to the 1/n of every row
        if fmask is not None:
            fw = torch.where(fmask, fw, torch.zeros_like(fw))
        clm = torch.zeros((), dtype=torch.float64, device=flat.device)
        fuse = torch.zeros((), dtype=torch.float64, device=flat.device)
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            c, f = _chunk_values(_head(flat[rows[sl]], weight, bias), targets[sl], ids[sl], lp[sl], lam, fw[sl],
                                 tail, temperature)
            clm += c
            fuse += f
        clm, fuse = (clm / max(n, 1)).float(), (fuse / max(n_fuse, 1)).float()
        ctx.save_for_backward(hidden, weight, bias, rows, targets, ids, lp, fw)
        ctx.settings = (lam, tail, temperature, chunk)
        ctx.mark_non_differentiable(clm, fuse)
        return lam * clm + (1 - lam) * temperature**2 * fuse if lam < 1.0 else clm.clone(), clm, fuse

    @staticmethod
    def backward(ctx, grad_loss, _clm, _fuse):
        hidden, weight, bias, rows, targets, ids, lp, fw = ctx.saved_tensors
        lam, tail, temperature, chunk = ctx.settings
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        flat = hidden.reshape(-1, hidden.shape[-1])
        n = rows.numel()
        grad_h = torch.zeros_like(flat) if want_h else None
        into = _grad_in_place(weight) if want_w else None  # the head's .grad itself: no [V, H] temporary
        grad_w = into if into is not None else (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        scale = grad_loss.float() / max(n, 1)
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            idx = rows[sl]
            h = flat[idx]
            _, _, g = _chunk_terms(_head(h, weight, bias), targets[sl], ids[sl], lp[sl], lam, fw[sl], tail,
                                   temperature)
            g.mul_(scale)
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if grad_h is not None:
                grad_h[idx] = (g @ weight).to(grad_h.dtype)
            if grad_w is not None:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h.float())
                else:  # the product in the head's dtype (fp32 accumulation inside the matmul), summed in fp32
                    grad_w += g.t() @ h.to(weight.dtype)
        if into is not None:  # already in .grad: autograd adds a zero that takes no memory
            grad_w = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        return (grad_h.view_as(hidden) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None) + (None,) * 9


def combined_loss_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
                              loss_mask: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, *,
                              lambda_clm: float, tail: str = "bucket", temperature: float = 1.0,
                              lm_head_bias: torch.Tensor | None = None, chunk: int | None = None,
                              chunk_bytes: int = HIDDEN_CHUNK_BYTES,
                              fusion_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`combined_loss` from the final hidden states and the LM head: the student's logits are
    computed chunk by chunk of scored positions inside the loss, forward and backward, so
    neither the [B, L, V] logits nor an [N, V] block of them is ever held whole.

    Equal in value and gradients (w.r.t. `hidden`, `lm_head_weight` and `lm_head_bias`) to
    `combined_loss(hidden @ lm_head_weightᵀ + lm_head_bias, ...)`. Memory beyond the model:
    one chunk's [chunk, V] float32 temporaries, and in backward a float32 [V, H] accumulator
    for the head's gradient (when it needs one). Models whose logits are not a plain linear
    head of the last hidden state (Gemma-2's `final_logit_softcapping`, Cohere's
    `logit_scale`, Granite's `logits_scaling`) are not supported by this path.

    Args:
        hidden: [B, L, H] the base model's last hidden state (after its final norm).
        lm_head_weight: [V, H] the output layer's weight (tied or not); lm_head_bias: [V] or None.
        input_ids, loss_mask, topk_ids, topk_logprobs, fusion_mask: as in `combined_loss`.
        chunk: rows per chunk; default: rows worth `chunk_bytes` of float32 [V] logits.

    Returns:
        {"loss", "clm", "fusion"} scalars.
    """
    vocab = lm_head_weight.shape[0]
    chunk = chunk or max(16, chunk_bytes // (4 * vocab))
    full = torch.zeros(input_ids.shape, dtype=torch.bool, device=loss_mask.device)
    full[:, :-1] = loss_mask
    rows = full.view(-1).nonzero().squeeze(-1).to(hidden.device)
    targets = input_ids[:, 1:][loss_mask].long()
    loss, clm, fuse = _HiddenChunkedLoss.apply(hidden, lm_head_weight, lm_head_bias, rows, targets,
                                               topk_ids.long(), topk_logprobs.float(), float(lambda_clm),
                                               fusion_mask, tail, float(temperature), chunk)
    return {"loss": loss, "clm": clm, "fusion": fuse}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a training wrapper (DDP, a DeepSpeed engine, a PEFT model)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel: the LM with its adapters injected
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed
            model = model.module
        else:
            return model


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def hidden_path(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(the base module whose output is the last hidden state, the LM head) when `batch_loss`
    can take the loss from hidden states; None when it must fall back to the logits:

    - logits that are not a plain linear head of that hidden state (a config with any of
      `SCALED_LOGITS` set, e.g. Gemma-2's soft-capping);
    - a head that is not a plain `nn.Linear` (a LoRA-wrapped head: its `.weight` would miss
      the adapter);
    - a forward without `logits_to_keep` (it keeps the model from building [B, L, V] logits).

    A head partitioned by DeepSpeed ZeRO-3 (its weight has a `ds_id`) is served: `batch_loss`
    runs the loss as the head module's forward (`_as_forward_of`).
    """
    import inspect

    core = _unwrap(model)
    config = getattr(core, "config", None)
    if config is None or any(getattr(config, key, None) not in (None, 1.0) for key in SCALED_LOGITS):
        return None
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    base = getattr(core, getattr(core, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or not isinstance(base, torch.nn.Module):
        return None
    if "logits_to_keep" not in inspect.signature(core.forward).parameters:
        return None
    return base, head


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The model's inputs for a collated batch: ids and the 2D padding mask, or for a packed batch
    (`collate_packed`: it has `segment_ids`) ids, the restarting position ids and attention that
    stays inside each packed sample:

    - eager / SDPA (CPU, and GPUs without flash-attn): a block-diagonal causal 4D mask
      (`batches.packed_attention_mask`) in the model's dtype, which transformers passes through
      as is. It costs B·L² mask entries and the attention still computes the masked blocks.
    - flash-attention (`attn_implementation="flash_attention_2"` on GPU): no mask, only the
      position ids; transformers reads the samples' boundaries from where they restart and
      calls the variable-length kernel, which skips the blocks across samples.
    """
    if "segment_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from fusion_ray.trainer.batches import packed_attention_mask

    core = _unwrap(model)
    if str(getattr(core.config, "_attn_implementation", "")).startswith("flash_attention"):
        return {"input_ids": batch["input_ids"], "attention_mask": None, "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": packed_attention_mask(batch["segment_ids"], core.dtype)}


def batch_loss(model, batch: dict[str, torch.Tensor], *, lam: float, tail: str, temperature: float,
               fusion_positions: str, loss_from: str = "logits",
               chunk_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The training step's forward: the model on a collated batch (`fusion_ray.trainer.batches`),
    then the loss. `fusion_positions`: "transferred" puts the fusion term only where a source reached.

    `loss_from="logits"` (default): `combined_loss` on the model's [B, L, V] logits, with its
    gradient written over them (nothing else reads them).
    `loss_from="hidden"`: `combined_loss_from_hidden` on the base model's last hidden state
    and the LM head's weight, so the [B, L, V] logits are never built. The model is still
    called through `model` (its DDP / DeepSpeed / PEFT wrapper's forward runs as usual) with
    `logits_to_keep=1`; a forward hook on the base module takes its output. Models this path
    cannot serve (`hidden_path` is None: soft-capped logits as Gemma-2's, a LoRA-wrapped head)
    fall back to the logits path; under ZeRO-3 the loss runs as the head module's forward
    (`_as_forward_of`), so that DeepSpeed gathers the head's weight for it. `chunk_bytes`
    (`train.loss_chunk_mb`): the hidden-state loss's chunk (None: `HIDDEN_CHUNK_BYTES`); the
    logits path does not use it.
    """
    fusion_mask = batch["transferred"] if fusion_positions == "transferred" else None
    args = (batch["input_ids"], batch["loss_mask"], batch["topk_ids"], batch["topk_logprobs"])
    if loss_from not in ("hidden", "logits"):
        raise ValueError(f"loss_from must be 'hidden' or 'logits', not {loss_from!r}")
    found = hidden_path(model) if loss_from == "hidden" else None
    if found is None:
        logits = model(**forward_inputs(model, batch)).logits
        return combined_loss(logits, *args, lambda_clm=lam, tail=tail, temperature=temperature, inplace=True,
                             fusion_mask=fusion_mask)
    base, head = found
    seen: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = base.register_forward_hook(keep)
    try:
        model(**forward_inputs(model, batch), logits_to_keep=1)
    finally:
        handle.remove()

    def loss(hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return combined_loss_from_hidden(hidden, head.weight, *args, lambda_clm=lam, tail=tail,
                                         temperature=temperature, lm_head_bias=head.bias, fusion_mask=fusion_mask,
                                         chunk_bytes=chunk_bytes or HIDDEN_CHUNK_BYTES)

    if hasattr(head.weight, "ds_id"):  # ZeRO-3: the head's weight exists whole only inside its module's calls
        return _as_forward_of(head, loss, seen[-1])
    return loss(seen[-1])


def _as_forward_of(module: torch.nn.Module, loss, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """`loss(hidden)` run as `module`'s forward, so that the hooks on the module run around it.

    Under DeepSpeed ZeRO-3 each rank holds a slice of the head's weight. Its hooks on the head
    module gather the whole weight before the module's forward and release it after; they mark
    the forward's output so that the weight is gathered again before the output's backward, and
    the forward's input so that it is released once the gradient has reached that input. The
    gradient autograd then accumulates into the weight goes through ZeRO-3's reduce-scatter as
    the head's own would. The chunked loss is exactly such a use of the weight: one input (the
    hidden states, the only tensor handed to the module) and one output (the loss); its CLM and
    fusion parts, which carry no gradient, come back beside the module call.
    """
    parts: dict[str, torch.Tensor] = {}

    def forward(h: torch.Tensor) -> torch.Tensor:
        out = loss(h)
        parts.update(out)
        return out["loss"]

    had = module.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) to put back
    module.forward = forward
    try:
        value = module(hidden)
    finally:
        if had is None:
            del module.forward
        else:
            module.forward = had
    return {"loss": value, "clm": parts["clm"], "fusion": parts["fusion"]}
