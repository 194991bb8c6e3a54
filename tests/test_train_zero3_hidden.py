"""The hidden-state loss under DeepSpeed ZeRO-3, whose head weight is partitioned across ranks:
`batch_loss` runs it as the head module's forward (`losses._as_forward_of`) so that DeepSpeed's
hooks gather the weight for the loss's forward and backward. On 2 gloo ranks (plain processes,
no Ray), tied and untied heads, with gradient checkpointing, 2 steps of 2 micro-batches: the same
losses, reduced gradients and weights as the logits path, and no [B, L, V] logits built."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import join_gloo_group, two_gloo_ranks

pytestmark = pytest.mark.timeout(300)

VOCAB = 97


def _batch(rank: int, micro: int, length: int = 12, k: int = 3):
    g = torch.Generator().manual_seed(100 * rank + micro)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0  # a padded row
    mask = attn[:, 1:].bool()
    n = int(mask.sum())
    top = torch.randint(0, VOCAB, (n, k), generator=g)
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k].contiguous()
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "topk_ids": top, "topk_logprobs": lp,
            "transferred": torch.ones(n, dtype=torch.bool)}


def _rank(rank: int, port: int, out: str) -> None:
    join_gloo_group(rank, port)
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_ray.config import TrainConfig
    from fusion_ray.trainer import losses
    from fusion_ray.trainer.strategies import DeepSpeed

    results = []
    for tied in (False, True):
        row = {"tied": tied}
        for loss_from in ("hidden", "logits"):
            torch.manual_seed(5)
            model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                 max_position_embeddings=32, tie_word_embeddings=tied))
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            t = TrainConfig(strategy="deepspeed", zero_stage=3, num_workers=2, global_batch_size=4,
                            micro_batch_size=1, lr=1e-2, bf16=False)
            s = DeepSpeed(model, t, lambda _: 1.0, "", rank, 2)
            head = s.module.get_output_embeddings()
            assert hasattr(head.weight, "ds_id") and head.weight.numel() == 0  # partitioned outside its calls
            widths = []
            hook = head.register_forward_hook(lambda _m, _i, o, seen=widths: seen.append(o.shape[-1] if o.dim() else 0))
            values, grads = [], []
            s.module.train()
            for step in range(2):
                for micro in range(2):
                    o = losses.batch_loss(s.model, _batch(rank, 2 * step + micro), lam=0.5, tail="bucket",
                                          temperature=1.0, fusion_positions="all", loss_from=loss_from)
                    values.append([o["loss"].item(), o["clm"].item(), o["fusion"].item()])
                    s.model.backward(o["loss"])
                    if micro == 1:
                        grads.append(safe_get_full_grad(head.weight).clone())
                    s.model.step()
            hook.remove()
            # the loss run as the head module's forward (`losses._as_forward_of`): a head call whose output
            # is the scalar loss
            row[loss_from] = {"taken": widths.count(0), "values": values,
                              "grads": [g.tolist() for g in grads], "head_outputs": widths,
                              "weights": {n: w.float().tolist() for n, w in s.full_state_dict().items()}}
        results.append(row)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)


@pytest.mark.integration  # 2 gloo ranks in spawned processes: the integration tier
def test_zero3_hidden_state_loss_equals_the_logits_path(tmp_path):
    ranks = two_gloo_ranks(_rank, tmp_path / "out")
    for rows in ranks:
        for row in rows:
            hidden, logits = row["hidden"], row["logits"]
            label = f"tied={row['tied']}"
            assert hidden["taken"] == 4 and logits["taken"] == 0, label
            # the logits path's head call returns [B, L, V] logits; the hidden path's model call keeps one
            # position and its second head call is the loss itself (a scalar)
            assert logits["head_outputs"] == [VOCAB] * 4, label
            assert hidden["head_outputs"] == [VOCAB, 0] * 4, label
            torch.testing.assert_close(torch.tensor(hidden["values"]), torch.tensor(logits["values"]),
                                       rtol=1e-5, atol=1e-6, msg=label)
            for a, b in zip(hidden["grads"], logits["grads"], strict=True):
                assert torch.tensor(b).abs().sum() > 0, label
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6, msg=label)
            for name, w in logits["weights"].items():
                torch.testing.assert_close(torch.tensor(hidden["weights"][name]), torch.tensor(w), rtol=1e-4,
                                           atol=1e-5, msg=f"{label} {name}")
    for r0, r1 in zip(*ranks, strict=True):  # the ranks agree: the gradient was reduced
        for a, b in zip(r0["hidden"]["grads"], r1["hidden"]["grads"], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-7)
