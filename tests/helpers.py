"""Builders shared by stage tests: small corpora and configs over tiny model dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusion_ray.config import FusionConfig, parse_config

TOPICS = ["compiler", "kernel", "socket", "pixel", "thread", "cache", "router", "parser",
          "river", "meadow", "lantern", "harvest", "violin", "glacier", "orchard", "harbor"]


def chat_rows(n: int, domain: str = "computing", start: int = 0) -> list[dict]:
    """n well-formed OpenAI-style rows with stable ids."""
    rows = []
    for i in range(start, start + n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"id": f"{domain}-{i}", "messages": [
            {"role": "user", "content": f"What is a {topic} (case {i})?"},
            {"role": "assistant", "content": f"A {topic} is a thing number {i}, described briefly."},
        ]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_config(workdir: Path, pivot: Path, sources: dict[str, Path], corpora: list[Path], **sections) -> FusionConfig:
    """A valid config over local tiny models; `sections` override whole config sections."""
    data = {
        "name": "test", "workdir": str(workdir),
        "pivot": {"name": "pivot", "path": str(pivot), "dtype": "float32"},
        "sources": [{"name": n, "path": str(p), "dtype": "float32"} for n, p in sources.items()],
        "data": {"train": [{"path": str(p)} for p in corpora], "max_length": 128, "shard_rows": 10},
        "collect": {"engine": "hf", "top_k": 4, "batch_size": 8, "num_cpus_per_actor": 0.5, "dtype": "float32"},
        "align": {"num_cpus": 0.5}, "fuse": {"num_cpus": 0.5},
        "ray": {"num_cpus": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def fused_copy(cfg: FusionConfig, workdir: Path, sources: tuple[str, ...] = ("gpt",), **train) -> FusionConfig:
    """`cfg` with only `sources`, under `workdir`, holding a copy of their fused data (nothing is
    recomputed), with `train` settings changed: a training run of its own on shared fused data."""
    import shutil

    data = cfg.to_dict()
    data["workdir"] = str(workdir)
    data["sources"] = [s for s in data["sources"] if s["name"] in sources]
    data["train"] = {**data["train"], **train}
    out = parse_config(data)
    for name in sources:
        shutil.copytree(cfg.stage_dir("fuse", name), out.stage_dir("fuse", name))
    return out


# The whole explicit pipeline at its smallest: one source, 24 training rows, 8 held-out rows, 3 steps.
# The CLI run of conftest's `cli_project` (relative paths) and test_object_store_pipeline's run (s3://
# URIs) share it, so that their reports can be compared arm by arm.
PIPELINE_TRAIN_ROWS, PIPELINE_HELDOUT_ROWS = 24, 8


def pipeline_config(workdir: str, pivot: str, source: str, train: str, heldout: str) -> dict:
    return {
        "name": "tiny", "workdir": workdir,
        "pivot": {"name": "pivot", "path": pivot, "dtype": "float32"},
        "sources": [{"name": "gpt", "path": source, "dtype": "float32", "domain": "computing"}],
        "data": {"train": [{"path": train, "domain": "computing"}], "max_length": 128, "shard_rows": 10,
                 "heldout": [{"path": heldout, "domain": "computing"}]},
        "collect": {"engine": "hf", "top_k": 4, "batch_size": 8, "num_cpus_per_actor": 0.5, "dtype": "float32"},
        "align": {"num_cpus": 0.5}, "fuse": {"num_cpus": 0.5},
        "train": {"strategy": "ddp", "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4,
                  "micro_batch_size": 4, "max_steps": 3, "checkpoint_every": 2, "lr": 1e-3, "lambda_clm": 0.7,
                  "clm_only_arm": True, "bf16": False, "fusion_positions": "transferred", "max_failures": 2},
        "merge": {"method": "sce", "variant": "fusechat", "dtype": "float32"},
        "eval": {"batch_size": 8},
        "ray": {"num_cpus": 4},
    }


CLI_RAY_TMP = Path(f"/tmp/frd{os.getpid()}")  # short: Ray's socket paths must stay < 108 characters


def fusion_ray_cli(cwd: Path, *args: str, timeout: float = 900):
    """`fusion-ray ARGS` in a subprocess run from `cwd` (its own local Ray, session files below
    `CLI_RAY_TMP`, where tests read its logs)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_TMPDIR": str(CLI_RAY_TMP), "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "fusion_ray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_reward_model(base: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised one-output sequence-classification model on `base`'s architecture and
    tokenizer (chat template included), saved as an HF model dir (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.from_pretrained(base, num_labels=1)
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def load(path):
    """A causal LM dir in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def make_adapter(base: Path, out: Path, seed: int, rank: int, targets: list[str]) -> tuple[Path, Path]:
    """An adapter dir with random factors on `base`, and peft's dense merge of it (the oracle's input)."""
    import shutil

    import peft
    import torch

    model = peft.get_peft_model(load(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(out / "adapter", save_embedding_layers=False)
    for tok in base.glob("tokenizer*"):
        shutil.copy2(tok, out / "adapter" / tok.name)
    model.merge_and_unload().save_pretrained(out / "dense")
    shutil.copy2(base / "config.json", out / "dense" / "config.json")
    return out / "adapter", out / "dense"


def two_adapters(tiny_models, root: Path) -> tuple[Path, tuple[Path, Path], tuple[Path, Path]]:
    """A tiny Qwen2 base and two adapters on it of other ranks and modules: (base, (adapter, merged) × 2)."""
    base = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    one = make_adapter(base, root / "one", 1, 4, ["q_proj", "v_proj", "down_proj"])
    two = make_adapter(base, root / "two", 2, 2, ["q_proj", "o_proj", "up_proj"])
    return base, one, two


def two_gloo_ranks(rank_fn, out: Path) -> list:
    """Run `rank_fn(rank, port, out_prefix)` as ranks 0 and 1 of one gloo group (two spawned processes,
    no Ray); each rank writes its JSON results to `{out_prefix}.{rank}`. Returns both ranks' results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_fn, args=(port, str(out)), nprocs=2, join=True)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]


def join_gloo_group(rank: int, port: int) -> None:
    """In a `two_gloo_ranks` process: rank `rank` of 2 joins the gloo group through DeepSpeed (on CPU)."""
    import os

    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from fusion_ray.config import TrainConfig
    from fusion_ray.trainer.strategies import import_deepspeed

    import_deepspeed(TrainConfig(strategy="deepspeed")).init_distributed(dist_backend="gloo",
                                                                         auto_mpi_discovery=False)
