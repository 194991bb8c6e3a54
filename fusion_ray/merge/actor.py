"""The Ray side of merging: `MergeActor`, standalone merges, and the pipeline's `merge` stage.

The driver checks the inputs and lays out the output shards (headers written, files
sized); each `MergeActor` then merges a contiguous, byte-balanced share of the tensors
and writes them straight into their slots, so N actors produce the same bytes as one
(DARE masks are seeded per tensor name). The output dir must be visible to every actor
(local disk on one node, a shared filesystem on a cluster).

The stage merges the pivot (base) with the fused targets of `train` (`targets/<pair>/`,
the CLM-only arm excluded) into `merged/`, with `cfg.merge` as the method and parameters.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fusion_ray import io, locations
from fusion_ray.config import FusionConfig, MergeConfig
from fusion_ray.merge.spec import MergeSpec, ModelInput, parse_spec
from fusion_ray.resources import MERGE_ACTOR_CPUS


class MergeActor:
    """Merges its share of the tensors of one planned output (wrapped by `ray.remote`)."""

    def __init__(self, spec: MergeSpec, seed: int, threads: int = 1):
        self.spec, self.seed, self.threads = spec, seed, threads

    def merge(self, names: list[str], slots: dict) -> dict:
        from fusion_ray.merge.engine import merge_names

        started = time.monotonic()
        written = merge_names(self.spec, names, slots, seed=self.seed, threads=self.threads)
        return {"tensors": len(names), "bytes": written, "wall_s": round(time.monotonic() - started, 3)}


def ray_parts(spec: MergeSpec, seed: int, num_cpus: float = 1.0):
    """A `run_parts` callback for `engine.fill_dir` that gives each group to one MergeActor."""

    def run(groups: list[list[str]], slots: dict) -> None:
        import ray

        remote = ray.remote(num_cpus=num_cpus)(MergeActor)
        actors = [remote.remote(spec, seed) for _ in groups]
        try:
            ray.get([a.merge.remote(g, {n: slots[n] for n in g}) for a, g in zip(actors, groups, strict=True)])
        finally:
            for a in actors:
                ray.kill(a)

    return run


def merge_standalone(spec: MergeSpec, out_dir: str, *, seed: int = 0, threads: int | None = None,
                     num_actors: int = 1, force: bool = False) -> dict:
    """`fusion-ray merge`: in this process on `threads` (default: the cores, at most 2), or on
    `num_actors` Ray actors (local Ray, or the cluster in RAY_ADDRESS)."""
    from fusion_ray.merge.engine import run_merge

    if num_actors > 1:
        from fusion_ray.ray_env import init_ray

        init_ray()
        return run_merge(spec, out_dir, seed=seed, force=force, run_parts=ray_parts(spec, seed), parts=num_actors)
    threads = threads or min(2, os.cpu_count() or 1)
    return run_merge(spec, out_dir, seed=seed, threads=threads, force=force)


def spec_from_config(merge: MergeConfig, pivot: str, targets: list[str]) -> MergeSpec:
    """The pipeline's `merge` section as a MergeSpec: pivot as base, targets as the models."""
    data = {"models": [ModelInput(model=t).model_dump() for t in targets], "base_model": pivot,
            "merge_method": merge.method, "parameters": dict(merge.parameters), "dtype": merge.dtype,
            "out_dtype": merge.out_dtype, "variant": merge.variant, "shard_size_mb": merge.shard_size_mb}
    return parse_spec(data, "merge")


def run(cfg: FusionConfig, force: bool = False, log=print) -> dict:
    """The `merge` stage: pivot + fused targets → `merged/` (skipped when its manifest matches)."""
    from fusion_ray.merge.engine import fill_dir
    from fusion_ray.ray_env import init_ray

    pivot = locations.local_dir(cfg.pivot.path, revision=cfg.pivot.revision)
    targets, fingerprints = [], {}
    for _, pair in cfg.pairs():
        path = cfg.stage_dir("train", pair)
        manifest = io.read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no finished train stage at {path}: run `train` first")
        targets.append(path)
        fingerprints[pair] = manifest["fingerprint"]
    spec = spec_from_config(cfg.merge, pivot, targets)
    out_dir = cfg.stage_dir("merge")
    pivot_fp = locations.fingerprint(cfg.pivot.path, revision=cfg.pivot.revision)
    fp = io.fingerprint("merge", cfg.to_dict()["merge"], fingerprints, pivot_fp)
    if not force and io.is_done(out_dir, fp):
        return {"status": "skipped", "dir": out_dir}
    if not io.is_local(out_dir):
        raise ValueError(f"merge writes a local (or shared-filesystem) model dir; workdir is {cfg.workdir}")
    init_ray(cfg.ray)
    out = io.StageOutput(out_dir, fp)
    for stale in Path(out.dir).iterdir():  # an interrupted merge restarts from scratch
        if stale.name != "_fingerprint":
            stale.unlink()
    stats = fill_dir(spec, Path(out.dir), seed=cfg.merge.seed,
                     run_parts=ray_parts(spec, cfg.merge.seed, MERGE_ACTOR_CPUS), parts=cfg.merge.num_actors)
    out.commit(io.Manifest(stage="merge", fingerprint=fp, config_hash=cfg.config_hash(),
                           inputs={"pivot": pivot_fp, **fingerprints},
                           rows={"tensors": stats["tensors"]},
                           extra={"method": cfg.merge.method, "targets": list(fingerprints), **stats}),
               config=cfg.to_dict())
    log(f"[merge] {cfg.merge.method} of {len(targets)} target(s) → {out_dir}")
    return {"status": "done", "dir": out_dir, **stats}
