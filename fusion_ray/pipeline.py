"""The stage sequence and what runs the stages in order.

The contract a stage keeps is `contract.py`'s. `runner(stage)` finds a stage's `run` from the
stage list (the only place that imports stages by name); `run_stages` runs stages in order,
timing each.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence

from fusion_ray.config import ALL_STAGES, STAGES, FusionConfig
from fusion_ray.contract import StageResult, stage_module
from fusion_ray.errors import StageFailed, describe, part_of

PIPELINE_STAGES = STAGES[:-1]  # `serve` deploys: only when asked (or `serve.deploy_after_merge`)


def pipeline_stages(cfg: FusionConfig) -> list[str]:
    """What `fusion-ray run` runs for this config's method: its stages but `serve`."""
    return [s for s in cfg.stages() if s != "serve"]


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


def write_failure_log(cfg: FusionConfig, stage: str, err: BaseException) -> str | None:
    """The whole traceback of a failed stage (and, for a Ray worker's error, the worker's own) in
    `<workdir>/logs/<stage>-<UTC time>.log`; its path, or None when it cannot be written."""
    import traceback

    from fusion_ray import io
    from fusion_ray.errors import remote_tracebacks

    text = "".join(traceback.format_exception(err))
    for remote in remote_tracebacks(err):
        text += f"\n--- on a Ray worker ---\n{remote}\n"
    path = f"{cfg.workdir}/logs/{stage}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    try:
        io.write_bytes_atomic(path, text.encode())
        return path
    except Exception:  # noqa: BLE001 - an unwritable workdir: the one line still names the cause
        return None


def record_stats(cfg: FusionConfig, stage: str, wall_s: float, peak_bytes: int) -> None:
    """Merge one stage's wall time and peak memory into `<workdir>/_stage_stats.json`."""
    import json

    from fusion_ray import io

    path = f"{cfg.workdir}/_stage_stats.json"
    stats = json.loads(io.read_text(path)) if io.exists(path) else {}
    stats[stage] = {"last_run_wall_s": round(wall_s, 1), "peak_rss_mb": round(peak_bytes / 2**20, 1)}
    io.write_json_atomic(path, stats)


def runner(stage: str) -> Callable[..., StageResult]:
    """The stage's `run(cfg, force=False, log=print) -> StageResult`."""
    return importlib.import_module(stage_module(stage)).run


def run_stage(stage: str, cfg: FusionConfig, *, force: bool = False, log=print) -> StageResult:
    """One stage, with what it needs run first: the implicit method's `eval` reads its arms'
    scored answers, which the `sample` and `reward` stages make on the eval's own config
    (`evaluate.implicit.answers_config`, below `<workdir>/_eval/`), each skipping itself when done."""
    if stage == "eval" and cfg.method == "implicit":
        from fusion_ray.evaluate.implicit import answer_log, answers_config

        answers = answers_config(cfg)
        for part in ("sample", "reward"):
            runner(part)(answers, force=force, log=answer_log(log))
    return runner(stage)(cfg, force=force, log=log)


def parse_stages(text: str | None, cfg: FusionConfig | None = None) -> list[str]:
    """`a,b` → ["a", "b"] in pipeline order; None → every pipeline stage (of `cfg`'s method).

    Raises:
        ValueError: naming stages that are unknown, or not of `cfg`'s method.
    """
    order = cfg.stages() if cfg is not None else STAGES
    if not text:
        return pipeline_stages(cfg) if cfg is not None else list(PIPELINE_STAGES)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ALL_STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(order)}")
    other = [s for s in wanted if s not in order]
    if other:
        raise ValueError(f"stage(s) {', '.join(other)} are not of method {cfg.method}; its stages: "
                         f"{', '.join(order)}")
    return [s for s in order if s in wanted]


def check_stages(cfg: FusionConfig, stages: Sequence[str]) -> None:
    """Disagreements between the config's stages, found before any work.

    Raises:
        ValueError: naming the config fields that disagree.
    """
    problems = [f"{s}: not a stage of method {cfg.method} (its stages: {', '.join(cfg.stages())})"
                for s in stages if s not in cfg.stages()]
    if "eval" in stages and cfg.method == "explicit" and not cfg.data.heldout:
        problems.append("data.heldout: the eval stage needs held-out corpora (each with a domain)")
    if "eval" in stages and cfg.method == "implicit" and not cfg.implicit.heldout:
        problems.append("implicit.heldout: the eval stage needs held-out prompts")
    if "merge" in stages:
        from fusion_ray.merge.spec import METHODS

        spec = METHODS[cfg.merge.method]
        n = len(cfg.source_pairs()) + 1  # the trained targets and the pivot as base
        if n < spec.min_inputs or (spec.max_inputs and n > spec.max_inputs):
            want = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"at least {spec.min_inputs}"
            problems.append(f"merge.method: {cfg.merge.method} takes {want} models (pivot included), but "
                            f"fuse.mode={cfg.fuse.mode} with {len(cfg.sources)} source(s) trains "
                            f"{len(cfg.source_pairs())} target(s)")
    if {"train", "sft", "dpo"} & set(stages):
        from fusion_ray.trainer.tracking import missing_package

        if why := missing_package(cfg.train.tracking.backend):
            problems.append(f"train.tracking: {why}")
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
    if cfg.implicit and cfg.implicit.reward:
        rm = cfg.implicit.reward
        if why := locations.reachable(rm.path, revision=rm.revision, what="model"):
            lines.append(f"implicit.reward: {why}")
    for split in ("prompts", "heldout") if cfg.implicit else ():
        for i, corpus in enumerate(getattr(cfg.implicit, split)):
            if why := locations.reachable(corpus.path, what="corpus"):
                lines.append(f"implicit.{split}.{i}: {why}")
    return lines


def relative_path_problems(cfg: FusionConfig, nodes: int = 1) -> list[str]:
    """One line per relative local path of the config that cannot name the same place on every
    node: in a `ray job submit --working-dir` job the workdir (it would land in the job's
    unpacked package, a temp dir deleted with it) and, on a cluster of several nodes, every one
    (each node reads its own disk). Paths were made absolute against the driver's directory
    when the config was loaded, which is right on one machine only."""
    import json
    import os

    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        in_package = bool(job and (json.loads(job).get("runtime_env") or {}).get("working_dir"))
    except (ValueError, AttributeError):
        in_package = False
    fix = "give an object-store URI (s3://bucket/…) or an absolute path that exists on every node (a shared filesystem)"
    if nodes > 1:
        where = f"on a Ray cluster of {nodes} nodes, each node reads its own disk"
        keys = list(cfg._relative_paths)
    elif in_package:
        where = "in a `ray job submit --working-dir` job it lands in the job's unpacked package (deleted with it)"
        keys = [k for k in cfg._relative_paths if k == "workdir"]
    else:
        return []
    return [f"{k}: relative path {cfg._relative_paths[k]!r}: {where}; {fix}" for k in keys]


class Unplaceable(ValueError):
    """A stage asks for resources that no node of the connected Ray can ever offer."""


def preflight(cfg: FusionConfig, stages: Sequence[str]) -> None:
    """Before any stage work: each stage's resource asks against the connected Ray's nodes.

    Ray would wait forever for an ask no node can host (GPUs on a CPU-only cluster, a TP size
    above any node's GPUs); this fails at once instead, one line per such ask.

    Raises:
        Unplaceable: naming the stage, the unit and what it asks.
    """
    import os

    from fusion_ray.resources import live_nodes, resource_asks, unplaceable

    asks = [a for stage in stages for a in resource_asks(cfg).get(stage, [])]
    cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not asks and not (cluster and cfg._relative_paths):
        return
    from fusion_ray.ray_env import init_ray

    init_ray(cfg.ray)
    nodes = live_nodes()
    if problems := relative_path_problems(cfg, len(nodes)):
        raise ValueError("paths that differ per node:\n  " + "\n  ".join(problems) if len(problems) > 1
                         else problems[0])
    problems = unplaceable(asks, nodes)
    if problems:
        raise Unplaceable("cannot place on the connected Ray:\n  " + "\n  ".join(problems))


def run_problems(cfg: FusionConfig, stages: Sequence[str]) -> list[str]:
    """One line per reason `stages` cannot run here: a relative path that is not the same on every
    node, an input that cannot be reached, code prompts with no sandbox to run them in."""
    problems = relative_path_problems(cfg) + unreachable(cfg)
    if "reward" in stages:
        from fusion_ray.reward.stage import sandbox_problem

        problems += [why] if (why := sandbox_problem(cfg)) else []
    return problems


def check_run(cfg: FusionConfig, stages: Sequence[str]) -> None:
    """What `run_stages` checks before any work, writing nothing: the stages agree with the config,
    every path means the same on every node, every input is reachable, the workdir writable.

    Raises:
        ValueError: one line per problem.
    """
    check_stages(cfg, stages)
    problems = run_problems(cfg, stages)
    if len(problems) == 1:
        raise ValueError(f"cannot run: {problems[0]}")
    if problems:
        raise ValueError("cannot reach:\n  " + "\n  ".join(problems))


def run_stages(cfg: FusionConfig, stages: Sequence[str], *, force: bool = False,
               log=print, checked: bool = False) -> dict[str, StageResult]:
    """Run `stages` in order; each skips itself when its manifest matches.

    Args:
        checked: `check_run` has passed already (the CLI runs it before it opens the run's log).

    Returns:
        stage → its result.
    """
    if not checked:
        check_run(cfg, stages)
    preflight(cfg, stages)
    results: dict[str, StageResult] = {}
    for stage in stages:
        started = time.monotonic()
        with MemorySampler() as mem:
            try:
                results[stage] = run_stage(stage, cfg, force=force, log=log)
            except (KeyboardInterrupt, StageFailed):
                raise
            except Exception as err:
                raise StageFailed(stage, part_of(err), describe(err), write_failure_log(cfg, stage, err)) from err
        wall = time.monotonic() - started
        status = results[stage].status
        if status != "skipped":
            record_stats(cfg, stage, wall, mem.peak)
        log(f"[{stage}] {status} in {wall:.1f}s")
    return results
