"""Loading the model to train (`fusion_ray/trainer/load.py`): in the training dtype, and under
DeepSpeed ZeRO-3 built partitioned on 2 gloo ranks (plain processes, no Ray), each rank holding
about half the elements, with the weights equal to the checkpoint's once gathered."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from fusion_ray.config import TrainConfig
from fusion_ray.trainer.load import load_model, read_flat, training_dtype

pytestmark = pytest.mark.timeout(300)


def tiny_llama(path, tied: bool, shard: str | None = None):
    """A Llama with odd sizes (33 hidden, 3 heads of 12, 1 KV head, MLP 37, vocab 101): many
    tensors have an odd element count, so the 2-rank partition pads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=33, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                                         max_position_embeddings=64, tie_word_embeddings=tied))
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def zero3(bf16: bool) -> TrainConfig:
    return TrainConfig(strategy="deepspeed", zero_stage=3, num_workers=2, global_batch_size=2, micro_batch_size=1,
                       bf16=bf16)


def _rank(rank: int, port: int, paths: list[str], out: str) -> None:
    """One of 2 ranks: load every model under ZeRO-3 (float32 and bf16), count, gather, compare."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    results = []
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 0, 77]])
    for path in paths:
        checkpoint = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                checkpoint.update(load_file(os.path.join(path, f)))
        for bf16 in (False, True):
            t = zero3(bf16)
            model = load_model(path, t)
            params = dict(model.named_parameters())
            row = {"path": path, "bf16": bf16, "local": sum(p.ds_tensor.numel() for p in params.values()),
                   "total": sum(p.ds_numel for p in params.values()),
                   "held": sum(p.data.numel() for p in params.values()),
                   "dtypes": sorted({str(p.ds_tensor.dtype) for p in params.values()}),
                   "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}
            dtype = training_dtype(t)
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            with deepspeed.zero.GatheredParameters(list(params.values())):
                row["unequal"] = [n for n, p in params.items() if not torch.equal(p.data, checkpoint[n].to(dtype))]
                with torch.no_grad():
                    mine, theirs = model(ids).logits.float(), reference(ids).logits.float()
                row["logits_diff"] = (mine - theirs).abs().max().item()
            results.append(row)
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)


@pytest.mark.integration  # 2 gloo ranks in spawned processes: the integration tier
def test_zero3_builds_the_model_partitioned_with_the_checkpoints_weights(tmp_path, tiny_models):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    tied = str(tiny_llama(tmp_path / "tied", tied=True))
    sharded = str(tiny_llama(tmp_path / "sharded", tied=False, shard="20KB"))
    assert os.path.exists(f"{sharded}/model.safetensors.index.json")  # the index path is exercised
    demo = [str(tiny_models(arch, "gpt2", vocab_size=257)) for arch in ("gpt2", "qwen2", "mistral")]  # the demo's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, [tied, sharded, *demo], str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"out.{r}")) for r in (0, 1)]

    for path in (tied, sharded, *demo):
        model = AutoModelForCausalLM.from_pretrained(path)
        tie = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert path != tied or tie
        total = sum(p.numel() for p in model.parameters())  # tied: the shared matrix once
        per_tensor = [p.numel() for p in model.parameters()]
        padded = sum(n + n % 2 for n in per_tensor)  # each tensor padded to a multiple of 2 ranks
        for bf16 in (False, True):
            rows = [next(r for r in rank if r["path"] == path and r["bf16"] == bf16) for rank in ranks]
            for row in rows:
                assert row["total"] == total
                assert row["local"] == padded // 2, "each rank holds its half of every tensor"
                assert row["held"] == 0, "no full parameter stays materialised after the load"
                assert row["dtypes"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])
                assert row["tied"] is tie
                assert row["unequal"] == [], "gathered weights equal the checkpoint's (in the training dtype)"
                assert row["logits_diff"] < (1e-5 if not bf16 else 1e-2)


def test_training_dtype_and_the_unpartitioned_load(tmp_path):
    path = tiny_llama(tmp_path / "m", tied=False)
    ddp = TrainConfig(strategy="ddp", bf16=True)
    zero2 = TrainConfig(strategy="deepspeed", zero_stage=2, bf16=True)
    zero2_fp32 = TrainConfig(strategy="deepspeed", zero_stage=2, bf16=False)
    assert training_dtype(ddp) == torch.float32  # DDP trains in float32 whatever train.bf16 says
    for t, want in ((ddp, torch.float32), (zero2, torch.bfloat16), (zero2_fp32, torch.float32)):
        model = load_model(str(path), t)
        assert {p.dtype for p in model.parameters()} == {want}
    from safetensors.torch import load_file

    weights = load_file(f"{path}/model.safetensors")
    got = load_model(str(path), zero2).state_dict()
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in weights.items())


def test_read_flat_reads_any_flat_range(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"m": torch.arange(7 * 5 * 3, dtype=torch.float32).reshape(7, 5, 3), "v": torch.arange(11.0)}
    save_file(tensors, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as fh:
        for key, t in tensors.items():
            n = t.numel()
            for lo, hi in ((0, n), (0, 1), (n - 1, n), (14, 16), (15, 30), (16, 61), (3, 4)):
                if hi <= n:
                    assert torch.equal(read_flat(fh, key, lo, hi), t.reshape(-1)[lo:hi]), (key, lo, hi)



def test_loss_from_setting_is_checked_and_reaches_the_training_step(tmp_path):
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fusion_ray.config import ConfigError, load_config
    from fusion_ray.trainer.loop import FusionObjective
    from fusion_ray.trainer.objective import Distill

    tiny = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_cpu.yaml"
    assert load_config(tiny).train.loss_from == "hidden"
    with pytest.raises(ConfigError, match="train.loss_from: Input should be 'hidden' or 'logits'"):
        load_config(tiny, ["train.loss_from=logit"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "m", tied=False))
    kept = []  # the hidden path calls the model with logits_to_keep=1: no [B, L, V] logits
    model.register_forward_pre_hook(lambda _m, _a, kw: kept.append(kw.get("logits_to_keep")), with_kwargs=True)
    rows = [{"input_ids": np.array([1, 5, 7, 9, 3]), "loss_mask": np.array([False, True, True, True]),
             "topk_ids": np.array([[5, 6], [7, 8], [9, 1]]), "topk_logprobs": np.full((3, 2), -1.0, np.float16)}]
    losses = {}
    for setting, keep in (("hidden", 1), ("logits", None)):
        cfg = load_config(tiny, [f"train.loss_from={setting}"])
        objective = FusionObjective(Distill(cfg.train.lambda_clm), cfg, 0, torch.device("cpu"))
        losses[setting] = objective.loss(model, rows)["loss"].item()
        assert kept[-1] == keep
    assert losses["hidden"] == pytest.approx(losses["logits"], rel=1e-5)
