"""The stage sequence and what runs each stage.

`STAGE_RUNNERS` maps each stage of DESIGN §2 to the `module:function` that runs it
(`run(cfg, force=False) -> dict`), or to None while that stage is not built yet.
Nothing here fakes a stage: asking to run an unbuilt stage is an error, and the
demo lists what is not built.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence

from fusion_ray.config import STAGES, FusionConfig

STAGE_RUNNERS: dict[str, str | None] = {
    "prepare": "fusion_ray.collect.prepare:run",
    "collect": "fusion_ray.collect.pipeline:run",
    "align": "fusion_ray.align.pipeline:run",
    "fuse": "fusion_ray.fuse.pipeline:run",
    "train": "fusion_ray.train.trainer:run",
    "merge": None,
    "eval": None,
    "serve": "fusion_ray.serve.stage:run",
}
PIPELINE_STAGES = STAGES[:-1]  # `serve` deploys: only when asked (or `serve.deploy_after_merge`)


class StageNotBuilt(RuntimeError):
    """The stage exists in the design but has no implementation yet."""


def built_stages() -> list[str]:
    return [s for s in STAGES if STAGE_RUNNERS[s]]


def runner(stage: str) -> Callable[..., dict]:
    if stage not in STAGE_RUNNERS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    target = STAGE_RUNNERS[stage]
    if target is None:
        raise StageNotBuilt(f"stage {stage!r} is not built yet")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def parse_stages(text: str | None) -> list[str]:
    """`a,b` → ["a", "b"] in pipeline order; None → every pipeline stage."""
    if not text:
        return list(PIPELINE_STAGES)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def run_stages(cfg: FusionConfig, stages: Sequence[str], *, force: bool = False,
               skip_unbuilt: bool = False, log=print) -> dict[str, dict]:
    """Run `stages` in order; each skips itself when its manifest matches.

    Args:
        skip_unbuilt: report unbuilt stages and go on (the demo) instead of failing.

    Returns:
        stage → its result (`{"status": "not built"}` for skipped unbuilt stages).
    """
    results: dict[str, dict] = {}
    for stage in stages:
        if STAGE_RUNNERS[stage] is None and skip_unbuilt:
            log(f"[{stage}] not built yet: skipped")
            results[stage] = {"status": "not built"}
            continue
        started = time.monotonic()
        results[stage] = runner(stage)(cfg, force=force)
        log(f"[{stage}] {results[stage].get('status', 'done')} in {time.monotonic() - started:.1f}s")
    return results
