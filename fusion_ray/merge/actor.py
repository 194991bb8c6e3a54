"""The Ray side of merging: `MergeActor`, standalone merges, and the pipeline's `merge` stage.

The driver checks the inputs and lays out the output shards (headers written, files
sized); each `MergeActor` then merges a contiguous, byte-balanced share of the tensors
and writes them straight into their slots, so N actors produce the same bytes as one
(DARE masks are seeded per tensor name). The actors share one node, whose local disk
holds the output (or its staging copy, uploaded when the output is on an object store).

The stage merges the pivot (base) with the fused targets of `train` (`targets/<pair>/`,
the CLM-only arm excluded) into `merged/`, with `cfg.merge` as the method and parameters.
"""

from __future__ import annotations

import os
import tempfile
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


def ray_parts(spec: MergeSpec, seed: int, num_cpus: float = 1.0, node_id: str | None = None):
    """A `run_parts` callback for `engine.fill_dir` that gives each group to one MergeActor.

    Args:
        node_id: pin the actors to this node (they write into a dir on its local disk).
    """

    def run(groups: list[list[str]], slots: dict) -> None:
        import ray

        options: dict = {"num_cpus": num_cpus}
        if node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        remote = ray.remote(MergeActor).options(**options)
        actors = [remote.remote(spec, seed) for _ in groups]
        try:
            ray.get([a.merge.remote(g, {n: slots[n] for n in g}) for a, g in zip(actors, groups, strict=True)])
        finally:
            for a in actors:
                ray.kill(a)

    return run


def local_inputs(spec: MergeSpec) -> MergeSpec:
    """The spec with every model reference (hub id, object-store URI, demo asset) as a local dir."""
    models = [m.model_copy(update={"model": locations.local_dir(m.model)}) for m in spec.models]
    base = locations.local_dir(spec.base_model) if spec.base_model else None
    return spec.model_copy(update={"models": models, "base_model": base})


def merge_standalone(spec: MergeSpec, out_dir: str, *, seed: int = 0, threads: int | None = None,
                     num_actors: int = 1, force: bool = False) -> dict:
    """`fusion-ray merge`: in this process on `threads` (default: the cores, at most 2), or on
    `num_actors` Ray actors (local Ray, or the cluster in RAY_ADDRESS). Inputs may be hub ids or
    object-store URIs (copied to this node once); an object-store OUT_DIR gets the merged files
    uploaded, the index last. A local OUT_DIR is checked (`engine.check_out_dir`: not a file;
    non-empty only with `force`, and then a previous merge's output) before any input is fetched."""
    from fusion_ray.merge.engine import check_out_dir, run_merge

    if not locations.is_remote(out_dir):
        check_out_dir(out_dir, force)  # before fetching any input
    spec = local_inputs(spec)
    if locations.is_remote(out_dir):
        if not force and locations.listing(out_dir):
            raise FileExistsError(f"output {out_dir} exists and is not empty (use --force to replace it)")
        with tempfile.TemporaryDirectory(prefix="fusion-ray-merge-") as tmp:
            stats = merge_standalone(spec, f"{tmp}/out", seed=seed, threads=threads, num_actors=num_actors)
            upload_model_dir(Path(stats["dir"]), out_dir)
        return {**stats, "dir": out_dir}
    if num_actors > 1:
        from fusion_ray.ray_env import init_ray

        init_ray()
        return run_merge(spec, out_dir, seed=seed, force=force, run_parts=ray_parts(spec, seed), parts=num_actors)
    threads = threads or min(2, os.cpu_count() or 1)
    return run_merge(spec, out_dir, seed=seed, threads=threads, force=force)


def upload_model_dir(local: Path, dest: str) -> None:
    """Every file of a merged dir to `dest`; the index (what loaders open first) goes last."""
    index = "model.safetensors.index.json"
    locations.upload(local, dest, skip=(index,))
    if (local / index).is_file():
        locations.upload(local / index, f"{dest.rstrip('/')}/{index}")


def spec_from_config(merge: MergeConfig, pivot: str, targets: list[str]) -> MergeSpec:
    """The pipeline's `merge` section as a MergeSpec: pivot as base, targets as the models."""
    data = {"models": [ModelInput(model=t).model_dump() for t in targets], "base_model": pivot,
            "merge_method": merge.method, "parameters": dict(merge.parameters), "dtype": merge.dtype,
            "out_dtype": merge.out_dtype, "variant": merge.variant, "shard_size_mb": merge.shard_size_mb}
    return parse_spec(data, "merge")


def merge_into(merge: MergeConfig, pivot_ref: str, target_refs: list[str], out_dir: str,
               num_cpus: float = MERGE_ACTOR_CPUS) -> dict:
    """Merge on this node: inputs copied here where they are not local, the result written into
    `out_dir` (a local dir) or, for an object-store `out_dir`, into a local staging dir and
    uploaded (the stage's manifest, written by the caller, comes last)."""
    import ray

    spec = spec_from_config(merge, locations.local_dir(pivot_ref), [locations.local_dir(t) for t in target_refs])
    node = ray.get_runtime_context().get_node_id()
    if not locations.is_remote(out_dir):
        for stale in Path(out_dir).iterdir():  # an interrupted merge restarts from scratch
            if stale.name != "_fingerprint":
                stale.unlink()
        return fill_dir_on(spec, Path(out_dir), merge, num_cpus, node)
    with tempfile.TemporaryDirectory(prefix="fusion-ray-merge-") as tmp:
        stats = fill_dir_on(spec, Path(tmp), merge, num_cpus, node)
        upload_model_dir(Path(tmp), out_dir)
    return stats


def fill_dir_on(spec: MergeSpec, out: Path, merge: MergeConfig, num_cpus: float, node: str) -> dict:
    from fusion_ray.merge.engine import fill_dir

    return fill_dir(spec, out, seed=merge.seed, run_parts=ray_parts(spec, merge.seed, num_cpus, node),
                    parts=merge.num_actors)


def run(cfg: FusionConfig, force: bool = False, log=print) -> dict:
    """The `merge` stage: pivot + fused targets → `merged/` (skipped when its manifest matches).

    The merge runs in one Ray task whose actors share that task's node: it copies inputs that
    live on a store or the hub to that node, merges onto its local disk and, when the workdir is
    an object store, uploads the result. Its stage dir is committed (manifest last) afterwards.
    """
    from fusion_ray.ray_env import init_ray

    targets, fingerprints = [], {}
    for _, pair in cfg.pairs():
        path = cfg.stage_dir("train", pair)
        manifest = io.read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no finished train stage at {path}: run `train` first")
        targets.append(path)
        fingerprints[pair] = manifest["fingerprint"]
    out_dir = cfg.stage_dir("merge")
    pivot_fp = locations.fingerprint(cfg.pivot.path, revision=cfg.pivot.revision)
    fp = io.fingerprint("merge", cfg.to_dict()["merge"], fingerprints, pivot_fp)
    if not force and io.is_done(out_dir, fp):
        return {"status": "skipped", "dir": out_dir}
    ray = init_ray(cfg.ray)
    out = io.StageOutput(out_dir, fp)
    task = ray.remote(merge_into).options(num_cpus=MERGE_ACTOR_CPUS, max_retries=1)
    stats = ray.get(task.remote(cfg.merge, cfg.pivot.path, targets, out.dir))
    out.commit(io.Manifest(stage="merge", fingerprint=fp, config_hash=cfg.config_hash(),
                           inputs={"pivot": pivot_fp, **fingerprints}, rows={"tensors": stats["tensors"]},
                           extra={"method": cfg.merge.method, "targets": list(fingerprints), **stats}),
               config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[merge] {cfg.merge.method} of {len(targets)} target(s): {rate(stats['tensors'], stats['wall_s'], 'tensors')} "
        f"→ {out_dir}")
    return {"status": "done", "dir": out_dir, **stats}
