"""The `merge` stage: the pivot (base) and the fused targets of `train` → `merged/`.

The targets are `targets/<pair>/` (the CLM-only arm excluded); `cfg.merge` gives the method
and its parameters. The merge itself runs on one node (`actor.merge_into`: `MergeActor`s
sharing that node's disk).
"""

from __future__ import annotations

from fusion_ray import io, locations
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.merge.actor import merge_into
from fusion_ray.resources import MERGE_ACTOR_CPUS


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """The `merge` stage: pivot + fused targets → `merged/` (skipped when its manifest matches).

    The merge runs in one Ray task whose actors share that task's node: it copies inputs that
    live on a store or the hub to that node, merges onto its local disk and, when the workdir is
    an object store, uploads the result. Its stage dir is committed (manifest last) afterwards.
    """
    from fusion_ray.ray_env import init_ray

    targets, fingerprints = [], {}
    for _, pair in cfg.source_pairs():
        path = cfg.stage_dir("train", pair)
        manifest = io.finished(path, "train")
        targets.append(path)
        fingerprints[pair] = manifest["fingerprint"]
    out_dir = cfg.stage_dir("merge")
    pivot_fp = locations.fingerprint(cfg.pivot.path, revision=cfg.pivot.revision)
    fp = io.fingerprint("merge", cfg.to_dict()["merge"], fingerprints, pivot_fp)
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    ray = init_ray(cfg.ray)
    task = ray.remote(merge_into).options(num_cpus=MERGE_ACTOR_CPUS, max_retries=1)
    stats = ray.get(task.remote(cfg.to_wire(), targets, out.dir))
    out.commit(io.Manifest(stage="merge", fingerprint=fp, config_hash=cfg.config_hash(),
                           inputs={"pivot": pivot_fp, **fingerprints}, rows={"tensors": stats["tensors"]},
                           extra={"method": cfg.merge.method, "targets": list(fingerprints), **stats}),
               config=cfg.to_dict())
    from fusion_ray.progress import rate

    log(f"[merge] {cfg.merge.method} of {len(targets)} target(s): {rate(stats['tensors'], stats['wall_s'], 'tensors')} "
        f"→ {out_dir}")
    return StageResult("done", [out_dir], stats)
