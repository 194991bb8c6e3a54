"""The stage sequence and what runs each stage.

`STAGE_RUNNERS` maps each stage to the `module:function` that runs it
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
    "merge": "fusion_ray.merge.actor:run",
    "eval": "fusion_ray.evaluate.stage:run",
    "serve": "fusion_ray.serve.stage:run",
}
PIPELINE_STAGES = STAGES[:-1]  # `serve` deploys: only when asked (or `serve.deploy_after_merge`)


class MemorySampler:
    """Peak memory of this process plus this machine's Ray worker processes.

    Sums each process's proportional set size (PSS: shared pages such as the object store
    split between the processes mapping them, so they count once), RSS where PSS cannot be
    read. Sampled every `interval` s while a stage runs (on a cluster: the head node only).
    """

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import os

        import psutil

        total = 0
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] == os.getpid() or cmd.startswith("ray::"):
                try:
                    total += proc.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except Exception:  # a process vanished mid-scan: sample again
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def record_stats(cfg: FusionConfig, stage: str, wall_s: float, peak_bytes: int) -> None:
    """Merge one stage's wall time and peak memory into `<workdir>/_stage_stats.json`."""
    import json

    from fusion_ray import io

    path = f"{cfg.workdir}/_stage_stats.json"
    stats = json.loads(io.read_text(path)) if io.exists(path) else {}
    stats[stage] = {"last_run_wall_s": round(wall_s, 1), "peak_rss_mb": round(peak_bytes / 2**20, 1)}
    io.write_json_atomic(path, stats)


class StageNotBuilt(RuntimeError):
    """The stage exists in the design but has no implementation yet."""


def overall_status(result: dict) -> str:
    """A stage's status; one made of parts (models, sources, pairs, targets) is `skipped`
    when every part was."""
    parts = [v for key in ("models", "sources", "pairs", "targets") for v in (result.get(key) or {}).values()
             if isinstance(v, dict) and "status" in v]
    if parts and all(p["status"] == "skipped" for p in parts):
        return "skipped"
    return result.get("status", "done")


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


def check_stages(cfg: FusionConfig, stages: Sequence[str]) -> None:
    """Disagreements between the config's stages, found before any work.

    Raises:
        ValueError: naming the config fields that disagree.
    """
    problems = []
    if "eval" in stages and not cfg.data.heldout:
        problems.append("data.heldout: the eval stage needs held-out corpora (each with a domain)")
    if "merge" in stages:
        from fusion_ray.merge.spec import METHODS

        spec = METHODS[cfg.merge.method]
        n = len(cfg.pairs()) + 1  # the trained targets and the pivot as base
        if n < spec.min_inputs or (spec.max_inputs and n > spec.max_inputs):
            want = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"at least {spec.min_inputs}"
            problems.append(f"merge.method: {cfg.merge.method} takes {want} models (pivot included), but "
                            f"fuse.mode={cfg.fuse.mode} with {len(cfg.sources)} source(s) trains "
                            f"{len(cfg.pairs())} target(s)")
    if problems:
        raise ValueError("config stages disagree:\n  " + "\n  ".join(problems))


def unreachable(cfg: FusionConfig) -> list[str]:
    """One line per thing that cannot be used from here: an unwritable workdir, and each model,
    tokenizer or corpus that cannot be reached (no weights are fetched: config.json at most)."""
    from fusion_ray import locations

    lines = [why] if (why := locations.writable(cfg.workdir)) else []
    for m in cfg.models():
        refs = [(m.path, "model")] + ([(m.tokenizer, "tokenizer")] if m.tokenizer and m.tokenizer != m.path else [])
        lines += [f"{m.name}: {why}" for ref, what in refs
                  if (why := locations.reachable(ref, revision=m.revision, what=what))]
    for i, corpus in enumerate(cfg.data.train):
        if why := locations.reachable(corpus.path, what="corpus"):
            lines.append(f"data.train.{i}: {why}")
    for i, corpus in enumerate(cfg.data.heldout):
        if why := locations.reachable(corpus.path, what="corpus"):
            lines.append(f"data.heldout.{i}: {why}")
    return lines


class Unplaceable(ValueError):
    """A stage asks for resources that no node of the connected Ray can ever offer."""


def preflight(cfg: FusionConfig, stages: Sequence[str]) -> None:
    """Before any stage work: each stage's resource asks against the connected Ray's nodes.

    Ray would wait forever for an ask no node can host (GPUs on a CPU-only cluster, a TP size
    above any node's GPUs); this fails at once instead, one line per such ask.

    Raises:
        Unplaceable: naming the stage, the unit and what it asks.
    """
    from fusion_ray.resources import live_nodes, resource_asks, unplaceable

    asks = [a for stage in stages for a in resource_asks(cfg).get(stage, [])]
    if not asks:
        return
    from fusion_ray.ray_env import init_ray

    init_ray(cfg.ray)
    problems = unplaceable(asks, live_nodes())
    if problems:
        raise Unplaceable("cannot place on the connected Ray:\n  " + "\n  ".join(problems))


def run_stages(cfg: FusionConfig, stages: Sequence[str], *, force: bool = False,
               skip_unbuilt: bool = False, log=print) -> dict[str, dict]:
    """Run `stages` in order; each skips itself when its manifest matches.

    Args:
        skip_unbuilt: report unbuilt stages and go on (the demo) instead of failing.

    Returns:
        stage → its result (`{"status": "not built"}` for skipped unbuilt stages).
    """
    built = [s for s in stages if STAGE_RUNNERS.get(s)]
    check_stages(cfg, built)
    problems = unreachable(cfg)
    if len(problems) == 1:
        raise ValueError(f"cannot run: {problems[0]}")
    if problems:
        raise ValueError("cannot reach:\n  " + "\n  ".join(problems))
    preflight(cfg, built)
    results: dict[str, dict] = {}
    for stage in stages:
        if STAGE_RUNNERS[stage] is None and skip_unbuilt:
            log(f"[{stage}] not built yet: skipped")
            results[stage] = {"status": "not built"}
            continue
        started = time.monotonic()
        with MemorySampler() as mem:
            results[stage] = runner(stage)(cfg, force=force, log=log)
        wall = time.monotonic() - started
        status = overall_status(results[stage])
        if status != "skipped":
            record_stats(cfg, stage, wall, mem.peak)
        log(f"[{stage}] {status} in {wall:.1f}s")
    return results
