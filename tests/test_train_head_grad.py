"""The hidden-state loss adds the head's gradient into its existing float32 `.grad` in place
(`losses._grad_in_place`): equal to autograd's own accumulation, taken only when it is, and
correct under DDP and DeepSpeed ZeRO-2 on 2 gloo ranks (plain processes, no Ray), whose
gradient reduction runs in hooks on the weight's accumulation. Whether the path was taken is
observed from outside the loss (`HeadGradWatch`), not counted by it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import join_gloo_group, two_gloo_ranks

from fusion_ray.trainer import losses
from fusion_ray.trainer.losses import combined_loss_from_hidden

pytestmark = pytest.mark.timeout(300)


def _inputs(seed: int = 0, b: int = 2, length: int = 7, h: int = 5, v: int = 31, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(b, length, h, generator=g), torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (b, length), generator=g)
    mask = torch.rand(b, length - 1, generator=g) > 0.2
    n = int(mask.sum())
    top = torch.randint(0, v, (n, k), generator=g)
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k].contiguous()
    return hidden, weight, ids, mask, top, lp, torch.randn(v, h, generator=g)


class HeadGradWatch:
    """Counts the backward passes in which the loss added the head's gradient into `weight.grad`
    itself: a pre-hook on the weight's AccumulateGrad node finds `.grad` already changed from what
    it held at `arm()` (on the plain path `.grad` changes only inside that node, after its
    pre-hooks). `plain=True` makes the loss take the plain path: an identity tensor hook on the
    weight, a case the in-place path declines (the hook would see its zero)."""

    def __init__(self, weight: torch.Tensor, plain: bool = False):
        self.weight, self.before, self.taken = weight, None, 0
        if plain:
            weight.register_hook(lambda g: g)
        self.node = torch.autograd.graph.get_gradient_edge(weight).node  # held: the graph reuses this node
        self.node.register_prehook(self._seen)

    def arm(self) -> None:
        """Call before each backward."""
        self.before = None if self.weight.grad is None else self.weight.grad.clone()

    def _seen(self, _grads) -> None:
        grad = self.weight.grad
        if self.before is not None and grad is not None and not torch.equal(grad, self.before):
            self.taken += 1


def _step(in_place: bool, grad: torch.Tensor | None, how: str = "backward"):
    """(hidden's grad, weight's grad afterwards, in-place count) for one loss × 1.3."""
    hidden, weight, ids, mask, top, lp, _ = _inputs()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    w.grad = None if grad is None else grad.clone()
    if how == "hook":
        w.register_hook(lambda g: g * 2)
    watch = HeadGradWatch(w, plain=not in_place)
    watch.arm()
    out = combined_loss_from_hidden(h, w, ids, mask, top, lp, lambda_clm=0.3, chunk=3)
    if how == "grad_of_hidden":
        (gh,) = torch.autograd.grad(out["loss"] * 1.3, [h])
        return gh, w.grad, watch.taken
    (out["loss"] * 1.3).backward(create_graph=how == "create_graph")
    return h.grad, w.grad, watch.taken


def test_in_place_head_gradient_equals_autogrades_accumulation():
    previous = _inputs()[-1]
    gh, gw, taken = _step(True, previous)
    # the oracle: the logits through plain autograd, the head's gradient added to the previous one
    hidden, weight, ids, mask, top, lp, _ = _inputs()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    logits = h @ w.T
    full = logits[:, :-1][mask]
    targets = ids[:, 1:][mask]
    clm = torch.nn.functional.cross_entropy(full, targets)
    fuse = losses.fusion_loss(full, top, lp)
    want_h, want_w = torch.autograd.grad((0.3 * clm + 0.7 * fuse) * 1.3, [h, w])
    assert taken == 1
    torch.testing.assert_close(gw, previous + want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, want_h, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
@pytest.mark.parametrize("how, grad", [("backward", None), ("hook", "previous"), ("create_graph", "previous"),
                                       ("grad_of_hidden", "previous")])
def test_in_place_is_not_taken_where_it_would_differ(how, grad):
    """No .grad yet (autograd keeps our buffer), a tensor hook, create_graph, autograd.grad of other inputs."""
    previous = _inputs()[-1] if grad else None
    gh, gw, taken = _step(True, previous, how)
    plain_h, plain_w, plain_taken = _step(False, previous, how)
    assert taken == 0 and plain_taken == 0
    torch.testing.assert_close(gh, plain_h, rtol=0, atol=0)
    if how == "grad_of_hidden":  # .grad untouched
        assert torch.equal(gw, previous)
    elif gw is not None:
        torch.testing.assert_close(gw, plain_w, rtol=0, atol=0)


# ------------------------------------------------------------------ 2 gloo ranks
def _batch(rank: int, micro: int, vocab: int, length: int = 12, k: int = 3):
    g = torch.Generator().manual_seed(100 * rank + micro)
    ids = torch.randint(0, vocab, (1, length), generator=g)
    mask = torch.ones(1, length - 1, dtype=torch.bool)
    n = length - 1
    top = torch.randint(0, vocab, (n, k), generator=g)
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k].contiguous()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "topk_ids": top,
            "topk_logprobs": lp, "transferred": torch.ones(n, dtype=torch.bool)}


def _rank(rank: int, port: int, out: str) -> None:
    """DDP and ZeRO-2 (the stages where the head's `.grad` is the whole gradient; ZeRO-3's
    partitioned head: tests/test_train_zero3_hidden.py), tied and untied head, with and without the
    in-place path: 2 steps of 2 micro-batches."""
    join_gloo_group(rank, port)
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_ray.config import TrainConfig
    from fusion_ray.trainer.losses import batch_loss
    from fusion_ray.trainer.strategies import DDP, DeepSpeed

    results = []
    for strategy in ("ddp", "zero2"):
        for tied in (False, True):
            row = {"strategy": strategy, "tied": tied}
            for in_place in (True, False):
                torch.manual_seed(5)
                model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     num_key_value_heads=2, max_position_embeddings=32,
                                                     tie_word_embeddings=tied))
                t = TrainConfig(strategy="ddp" if strategy == "ddp" else "deepspeed",
                                zero_stage=2, num_workers=2, global_batch_size=4,
                                micro_batch_size=1, lr=1e-2)
                if strategy == "ddp":
                    s = DDP.__new__(DDP)
                    s._setup(torch.nn.parallel.DistributedDataParallel(model), t, lambda _: 1.0, 2, "", rank, 2)
                else:
                    s = DeepSpeed(model, t, lambda _: 1.0, "", rank, 2)
                watch, grads = HeadGradWatch(s.module.get_output_embeddings().weight, plain=not in_place), []
                for step in range(2):
                    for micro in range(2):
                        step_out = batch_loss(s.model, _batch(rank, 2 * step + micro, 97), lam=0.5, tail="bucket",
                                         temperature=1.0, fusion_positions="all", loss_from="hidden")
                        head = s.module.get_output_embeddings().weight
                        watch.arm()
                        if strategy == "ddp":
                            s.backward(step_out["loss"])
                            if micro == 1:
                                grads.append(head.grad.clone())
                                s.step()
                        else:  # the engine's backward alone, to read the reduced gradient before its step
                            s.model.backward(step_out["loss"])
                            if micro == 1:
                                grads.append(safe_get_full_grad(head).clone())
                            s.model.step()
                weights = s.full_state_dict() if strategy != "ddp" else s.module.state_dict()
                key = "in_place" if in_place else "plain"
                row[key] = {"taken": watch.taken,
                            "grads": [g.tolist() for g in grads],
                            "weights": {n: w.float().tolist() for n, w in weights.items()}}
            results.append(row)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)


@pytest.mark.integration  # 2 gloo ranks in spawned processes: the integration tier
def test_ddp_and_zero_reduce_the_in_place_head_gradient(tmp_path):
    ranks = two_gloo_ranks(_rank, tmp_path / "out")
    for rows in ranks:
        for row in rows:
            mine, plain = row["in_place"], row["plain"]
            label = f"{row['strategy']} tied={row['tied']}"
            assert plain["taken"] == 0, label
            # DDP keeps .grad between micro-steps: the path runs on each second one. ZeRO-2's hook
            # moves the gradient into its partition and sets .grad to None: it never runs there.
            assert mine["taken"] == (2 if row["strategy"] == "ddp" else 0), label
            for a, b in zip(mine["grads"], plain["grads"], strict=True):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-7, msg=label)
                assert torch.tensor(a).abs().sum() > 0, label
            for name, w in plain["weights"].items():
                torch.testing.assert_close(torch.tensor(mine["weights"][name]), torch.tensor(w), rtol=1e-5,
                                           atol=1e-6, msg=f"{label} {name}")
    # the ranks agree (the reduction ran): the same gradient and weights on both
    for r0, r1 in zip(*ranks, strict=True):
        for a, b in zip(r0["in_place"]["grads"], r1["in_place"]["grads"], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-7)
