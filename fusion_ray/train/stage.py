"""The `train` stage: one Ray Train `TorchTrainer` run per fused dataset (and the CLM-only arm).

Pairwise fusion gives one target per source (FuseChat); `train.clm_only_arm` adds the
same pivot trained on the same rows, steps and seed with λ = 1, so the report can
show what fusion adds. Each run (`trainer/fit.py`, shared with implicit fusion's `sft`)
reads the fused Parquet in one deterministic order,
checkpoints through `ray.train.report` under `<workdir>/_ray_train/` (Ray Train's
`storage_path`: local, or the object store the workdir is on) and restarts from the
latest checkpoint after a worker failure (`train.max_failures`). The final checkpoint
becomes `targets/<arm>/` (uploaded when the workdir is an object store): an HF model
dir with the pivot's tokenizer and chat template, plus `train_log.jsonl`, which rank 0
also republishes there while training runs.

Strategies: `deepspeed` (ZeRO-2/3, bf16, optional CPU offload; NCCL on GPU, gloo on
CPU) and `ddp`. A fused dataset built for another pivot vocabulary fails before work,
naming both sizes; each run's checkpoints live under a name carrying its fingerprint,
and `train.resume_from` (a checkpoint of an earlier run) is refused, naming both
config hashes, when it was written by another config.
"""

from __future__ import annotations

import functools

from fusion_ray import io
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.trainer.fit import fit_target
from fusion_ray.trainer.objective import Distill


def arms(cfg: FusionConfig) -> list[tuple[str, str, str]]:
    """(target name, arm, fused dataset it reads): one per pair, plus the CLM-only arm."""
    out = [(pair, "fused", pair) for _, pair in cfg.source_pairs()]
    if cfg.train.clm_only_arm:
        out.append(("clm_only", "clm_only", out[0][2]))
    return out


def train_arm(cfg: FusionConfig, name: str, arm: str, dataset: str, force: bool = False,
              log=print) -> StageResult:
    """One arm of the `train` stage: the pivot trained on the fused dataset `dataset` into `targets/<name>`."""
    fused_dir = cfg.stage_dir("fuse", dataset)
    manifest = io.finished(fused_dir, "fuse")
    return fit_target(cfg, objective=Distill(cfg.train.lambda_for(arm)), name=name, arm=arm, data_dir=fused_dir,
                      manifest=manifest,
                      out_dir=cfg.stage_dir("train", name), stage="train", input_name="fused",
                      extra={"dataset": dataset}, force=force, log=log)


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Train one target per fused dataset (and the CLM-only arm when enabled).

    The arms are independent `TorchTrainer` runs: each `fit()` runs in its own driver thread,
    `train.max_concurrent_arms` at a time (None: all; `fusion_ray.parallel`). Each arm's
    result (`parts`) carries its wall-clock `started_at` / `finished_at`.
    """
    from fusion_ray.parallel import run_parts
    from fusion_ray.ray_env import init_ray

    init_ray(cfg.ray)
    parts = {name: functools.partial(train_arm, cfg, name, arm, data, force, log) for name, arm, data in arms(cfg)}
    if len(parts) > 1 and cfg.train.max_concurrent_arms != 1:
        log(f"[train] {len(parts)} arms, {cfg.train.max_concurrent_arms or len(parts)} at a time: {', '.join(parts)}")
    outcomes = run_parts(parts, cfg.train.max_concurrent_arms, thread_prefix="train")
    return StageResult.of_outcomes(outcomes)
