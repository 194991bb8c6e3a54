"""Implicit fusion's training arms and where each one's data and models live.

The fused arm (`FUSED_ARM`) trains on every source's samples: `pairs/sft|dpo/` → `sft/` → `dpo/`.
A single-source arm (`only-<source>`, one per name in `implicit.single_source_arms`) trains on
one source's samples only, with the same prompt split and pairing rules:
`pairs/only-<source>/sft|dpo/` → `sft-only-<source>/` → `dpo-only-<source>/`. The `eval` stage
sets each finished arm's SFT+DPO model beside the fused one, so the report says what fusing the
sources adds over the best of them alone.
"""

from __future__ import annotations

from fusion_ray.config import FusionConfig

FUSED_ARM = "fused"
SINGLE = "only-"


def training_arms(cfg: FusionConfig) -> list[str]:
    """The fused arm first, then one per `implicit.single_source_arms` entry (config order)."""
    return [FUSED_ARM, *(SINGLE + s for s in cfg.implicit.single_source_arms)]


def arm_source(arm: str) -> str | None:
    """The one source a single-source arm trains on; None for the fused arm."""
    return None if arm == FUSED_ARM else arm.removeprefix(SINGLE)


def arm_dir(cfg: FusionConfig, stage: str, arm: str) -> str:
    """An arm's output of `pairs`, `sft` or `dpo` (the fused arm's is the stage's own dir)."""
    if arm == FUSED_ARM:
        return cfg.stage_dir(stage)
    if stage == "pairs":
        return cfg.stage_dir("pairs", arm)
    return f"{cfg.stage_dir(stage)}-{arm}"


def arm_name(stage: str, arm: str) -> str:
    """The run's name in logs and Ray Train: `sft`, `dpo-only-qwen`, …"""
    return stage if arm == FUSED_ARM else f"{stage}-{arm}"


def run_arms(cfg: FusionConfig, stage: str, train_arm, force: bool, log):
    """`train_arm(cfg, arm, force, log)` for every arm, `train.max_concurrent_arms` at a time; one
    arm's result as is, several as the parts of one result."""
    import functools

    from fusion_ray.contract import StageResult
    from fusion_ray.parallel import run_parts

    arms = training_arms(cfg)
    if len(arms) == 1:
        return train_arm(cfg, arms[0], force, log)
    limit = cfg.train.max_concurrent_arms
    log(f"[{stage}] {len(arms)} arms, {limit or len(arms)} at a time: {', '.join(arms)}")
    parts = {arm: functools.partial(train_arm, cfg, arm, force, log) for arm in arms}
    return StageResult.of_outcomes(run_parts(parts, limit, thread_prefix=stage))
