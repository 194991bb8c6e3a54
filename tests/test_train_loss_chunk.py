"""`train.loss_chunk_mb`: the hidden-state loss's chunk is a setting; it is checked, reaches the
loss from the training loop (more, smaller chunks; the same loss and gradients) and stays out of the
fingerprint. `fusion-ray plan`'s use of it: tests/test_plan.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fusion_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_cpu.yaml"


def test_loss_chunk_mb_is_checked_and_out_of_the_fingerprint():
    from fusion_ray.trainer.fit import result_fields

    assert load_config(TINY).train.loss_chunk_mb is None  # None: the loss's own default (128 MiB)
    assert load_config(TINY, ["train.loss_chunk_mb=32"]).train.loss_chunk_mb == 32
    with pytest.raises(ConfigError, match=r"train\.loss_chunk_mb: Input should be greater than or equal to 1"):
        load_config(TINY, ["train.loss_chunk_mb=0"])
    with pytest.raises(ConfigError, match=r"train\.loss_chunk_mb: Input should be less than or equal to 4096"):
        load_config(TINY, ["train.loss_chunk_mb=5000"])
    with pytest.raises(ConfigError, match=r"train\.loss_chunk_mb"):
        load_config(TINY, ["train.loss_chunk_mb=lots"])
    # memory and speed only: a run with another chunk resumes and is the same result
    assert result_fields(load_config(TINY, ["train.loss_chunk_mb=8"])) == result_fields(load_config(TINY))


def test_loss_chunk_mb_reaches_the_loss_of_the_training_step(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_ray.trainer.loop import FusionObjective
    from fusion_ray.trainer.objective import Distill

    vocab = 8192  # 1 MiB of float32 logits rows is 2^20 / (4 · 8192) = 32 positions
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         tie_word_embeddings=False))
    g = np.random.default_rng(0)
    rows = []
    for length in (41, 38):  # 40 + 37 = 77 scored positions
        rows.append({"input_ids": g.integers(0, vocab, length), "loss_mask": np.ones(length - 1, bool),
                     "topk_ids": g.integers(0, vocab, (length - 1, 3)),
                     "topk_logprobs": np.log(np.full((length - 1, 3), 0.3)).astype(np.float16)})
    head = model.lm_head.weight
    sizes: list[int] = []  # rows of each chunk the hidden-state loss computes logits for (2D head matmuls)

    class Chunks(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear and args[1] is head and args[0].dim() == 2:
                sizes.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    seen = {}
    for setting in (None, 1):
        sizes.clear()
        model.zero_grad(set_to_none=True)
        cfg = load_config(TINY, [f"train.loss_chunk_mb={setting}"] if setting else [])
        with Chunks():
            out = FusionObjective(Distill(cfg.train.lambda_clm), cfg, 0, torch.device("cpu")).loss(model, rows)
        out["loss"].backward()
        seen[setting] = (list(sizes), out["loss"].item(), model.lm_head.weight.grad.clone(),
                         model.model.embed_tokens.weight.grad.clone())
    assert seen[None][0] == [77]  # the default chunk (2^27 / 32768 = 4096 rows) holds them all
    assert seen[1][0] == [32, 32, 13]
    assert seen[1][1] == pytest.approx(seen[None][1], rel=1e-6)
    for a, b in zip(seen[1][2:], seen[None][2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_each_step_reports_its_own_transfer_and_clm_alone_reports_none():
    """The training line's figures are one window each: `transferred` is the step's share of scored
    positions a source reached (not a running mean over the run), and the CLM-only arm (λ = 1) has
    no fusion term or transfer to report."""
    from fusion_ray.trainer.fit import summary
    from fusion_ray.trainer.loop import FusionObjective
    from fusion_ray.trainer.objective import Distill

    cfg = load_config(TINY)
    out = {"clm": torch.tensor(2.0), "fusion": torch.tensor(3.0)}
    fused = FusionObjective(Distill(0.5), cfg, 0, torch.device("cpu"))
    fused.observe(torch.ones(10, dtype=torch.bool))  # step 1: every position reached
    assert fused.metrics(out)["transferred"] == 1.0
    fused.observe(torch.zeros(6, dtype=torch.bool))  # step 2, two micro-batches: 1 of 8 reached
    fused.observe(torch.tensor([True, False]))
    assert fused.metrics(out) == {"clm": 2.0, "fusion": 3.0, "transferred": 1 / 8}
    clm = FusionObjective(Distill(1.0), cfg, 0, torch.device("cpu"))
    clm.observe(torch.ones(4, dtype=torch.bool))
    assert clm.metrics(out) == {"clm": 2.0}

    line = summary({"step": 40, "loss": 2.5, "clm": 2.0, "fusion": 3.0, "transferred": 0.125, "lr": 1e-4,
                    "tokens_per_s": 812.0, "step_s": 3.4}, 139.2)
    assert line == ("40 steps in 139.2s (0.3 steps/s); last step: loss 2.5, clm 2, fusion 3, transferred 0.125, "
                    "lr 0.0001, step_s 3.4; mean over the run: tokens_per_s 812")
