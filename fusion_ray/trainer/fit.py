"""Training a target with Ray Train: what the `train` stage's arms and implicit fusion's `sft` and
`dpo` stages share (`fit_target`).

One `TorchTrainer` per target: every worker reads its micro-batches of one deterministic row
order itself (`trainer/order.py`), the strategy (DeepSpeed ZeRO or DDP) trains with the objective
the stage handed in (`trainer/objective.py`, `trainer/loop.py`), checkpoints go below
`<workdir>/_ray_train/`, and the final weights, config, log and the pivot's tokenizer files become
an HF model dir, committed atomically.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from fusion_ray import io, locations
from fusion_ray.checkpoint.adapter import MERGED_DIR
from fusion_ray.config import FusionConfig, TrainConfig, local_vocab_size
from fusion_ray.contract import StageResult
from fusion_ray.errors import InputError
from fusion_ray.trainer.objective import Objective
from fusion_ray.trainer.objective import to_wire as objective_wire
from fusion_ray.trainer.order import PACKING_ORDER, RowPlan
from fusion_ray.trainer.strategies import META, STATE, check_meta

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def result_fields(cfg: FusionConfig) -> dict:
    """The train settings that change what is trained (not where it resumes or how often it reports)."""
    fields = {k: v for k, v in cfg.to_dict()["train"].items()
              if k not in ("resume_from", "max_failures", "report_every", "gradient_checkpointing",
                           "max_concurrent_arms", "tracking", "loss_from",
                           "loss_chunk_mb")}
    for k in ("packing", "peft"):  # off, the fingerprint is the one runs had before the setting existed
        if not fields.get(k):
            fields.pop(k, None)
    if fields.get("packing"):  # the packing order (trainer/order.py): packed runs of the next-fit-only order
        fields["packing"] = PACKING_ORDER  # do not resume into this one
    return fields


def check_vocab(fused_dir: str, manifest: dict, pivot: str) -> None:
    """The fused teacher's pivot vocabulary must fit the model's embedding."""
    vocab, embedding = manifest["extra"].get("pivot_vocab"), local_vocab_size(pivot)
    if vocab is not None and embedding is not None and vocab > embedding:
        raise ValueError(f"{fused_dir} was built for a pivot vocabulary of {vocab} tokens, but the model at "
                         f"{pivot} has an embedding of {embedding}: they do not match")


def check_complete(data_dir: str, plan: RowPlan, manifest: dict) -> None:
    """The files the workers will read hold every row the input's manifest counts (a shard lost
    after its stage finished would otherwise shrink the training set without a word).

    Raises:
        InputError: naming the dir, the counts and the missing `part-NNNNN` files where the
            numbering shows them, before any worker starts.
    """
    expected = (manifest.get("rows") or {}).get("out")
    if expected is None or plan.rows == expected:
        return
    numbers = sorted(int(m.group(1)) for f in plan.files if (m := re.match(r"part-(\d+)\.parquet$", io.basename(f))))
    gaps = sorted(set(range(numbers[-1] + 1)) - set(numbers)) if numbers else []
    missing = f" (missing: {', '.join(f'part-{i:05d}.parquet' for i in gaps[:5])})" if gaps else ""
    raise InputError(f"{data_dir} is incomplete: its manifest counts {expected} rows, its {len(plan.files)} "
                     f"file(s) hold {plan.rows}{missing}; rerun the {manifest.get('stage', 'earlier')} stage "
                     f"with --force")


def fit_target(cfg: FusionConfig, *, objective: Objective, name: str, arm: str, data_dir: str, manifest: dict,
               out_dir: str, stage: str, input_name: str, train: TrainConfig | None = None,
               init_path: str | None = None, tracking_params: dict | None = None, extra: dict | None = None,
               force: bool = False, fingerprint_parts: tuple = (), log=print) -> StageResult:
    """Train the pivot (or the model at `init_path`) on the rows at `data_dir` with `objective`
    (Ray Train, the strategy of `train`, default `cfg.train`) into the HF model dir `out_dir`;
    skipped when its manifest matches. The stage that calls this decides the objective and the
    training settings; the manifest records both as used. `fingerprint_parts`: what else decides
    the result (they join the fingerprint)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from fusion_ray import progress
    from fusion_ray.trainer.failures import Trainer
    from fusion_ray.trainer.loop import train_loop_per_worker

    pivot = locations.local_dir(cfg.pivot.path, revision=cfg.pivot.revision)
    check_vocab(data_dir, manifest, pivot)
    pivot_fp = locations.fingerprint(cfg.pivot.path, revision=cfg.pivot.revision)
    t = train or cfg.train
    run_cfg = cfg if train is None else cfg.model_copy(update={"train": train})  # what the workers read
    fp = io.fingerprint(stage, arm, result_fields(run_cfg), cfg.data.max_length, manifest["fingerprint"],
                        pivot_fp, *fingerprint_parts)
    started = time.monotonic()
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    resume = None
    if t.resume_from:
        from ray.train import Checkpoint

        local = locations.local_dir(t.resume_from)  # a checkpoint on a store is copied here once
        check_meta(local, fp, t.strategy, t.num_workers)
        resume = Checkpoint.from_directory(local)
    packing = t.packing and objective.packs
    plan = RowPlan.of(data_dir, t.seed, t.shuffle, t.shuffle_window_rows, lengths=packing)
    check_complete(data_dir, plan, manifest)
    storage_fs, storage = io.resolve(f"{cfg.workdir}/_ray_train")
    run_name = f"{cfg.name}-{name}-{fp}"
    if force:  # Ray Train resumes a run of the same name from its checkpoints: --force starts afresh
        import pyarrow.fs as pafs

        if storage_fs.get_file_info(f"{storage}/{run_name}").type == pafs.FileType.Directory:
            storage_fs.delete_dir(f"{storage}/{run_name}")
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={"cfg": run_cfg.to_wire(), "arm": arm, "name": name, "plan": plan.to_wire(),
                           "objective": objective_wire(objective), "init_path": init_path,
                           "log_path": log_path(out), "fingerprint": fp,
                           "tracking": tracking_run(run_cfg, stage, name, arm, {
                               "fingerprint": fp, f"data_fingerprint.{input_name}": manifest["fingerprint"],
                               "pivot_fingerprint": pivot_fp, **(tracking_params or {})})},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     accelerator_type=t.accelerator_type),
        run_config=RunConfig(name=run_name, storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level=progress.train_log_level())),
        resume_from_checkpoint=resume,
    )
    result = trainer.fit()
    copy_target(result.checkpoint, pivot, out)
    if t.peft is not None and t.peft.save_merged:  # LoRA: base + adapter as dense weights in merged/
        write_merged(result.checkpoint, locations.local_dir(init_path) if init_path else pivot, pivot, out)
    out.commit(io.Manifest(stage=stage, fingerprint=fp, config_hash=cfg.config_hash(),
                           inputs={input_name: manifest["fingerprint"]}, rows={"in": manifest["rows"]["out"]},
                           extra={"arm": arm, **(extra or {}), "metrics": result.metrics, **objective.record(),
                                  "lr": t.lr, "epochs": t.epochs, "max_steps": t.max_steps,
                                  "strategy": t.strategy, "checkpoint": checkpoint_uri(result.checkpoint)},
                           wall_time_s=time.monotonic() - started), config=cfg.to_dict())
    log(f"[{stage}] {name}: {summary(result.metrics or {}, time.monotonic() - started)}")
    return StageResult("done", [out_dir], {"metrics": result.metrics})


RUN_MEANS = ("tokens_per_s",)  # the loop averages these over the run; its other figures are one step's


def summary(metrics: dict, seconds: float) -> str:
    """A trained target's line: steps and time, then the last step's figures and the run's means,
    each group named by its window."""
    from fusion_ray.progress import rate

    def fmt(figures: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())

    last = {k: v for k, v in metrics.items() if k != "step" and k not in RUN_MEANS}
    means = {k: metrics[k] for k in RUN_MEANS if k in metrics}
    parts = [rate(int(metrics.get("step", 0)), seconds, "steps")]
    parts += [f"last step: {fmt(last)}"] if last else []
    parts += [f"mean over the run: {fmt(means)}"] if means else []
    return "; ".join(parts)


def tracking_run(cfg: FusionConfig, stage: str, name: str, arm: str, fingerprints: dict) -> dict:
    """What the training loop's tracker (`trainer/tracking.py`) names its run and logs as parameters
    besides the config: the run's fingerprint and those of its data, its pivot and what the stage adds."""
    prefix = cfg.train.tracking.run_name or cfg.name
    return {"run_name": f"{prefix}-{stage}-{name}", "stage": stage, "target": name, "arm": arm,
            "params": {**fingerprints, "config_hash": cfg.config_hash()}}


def log_path(out: io.StageOutput) -> str:
    """Where rank 0 republishes the log: the output dir (a URI on stores, an absolute local path)."""
    path = out.path("train_log.jsonl")
    return path if locations.is_remote(path) else str(Path(path).expanduser().absolute())


def copy_target(checkpoint, pivot: str, out: io.StageOutput) -> None:
    """The final checkpoint's weights, config and log, and the pivot's tokenizer files, into the
    output dir (uploaded on object stores); optimizer state and partitions stay behind."""
    with checkpoint.as_directory() as ckpt:  # a local copy when the checkpoint is on a store
        for item in sorted(Path(ckpt).iterdir()):
            if item.is_file() and item.name not in (STATE, META):
                locations.upload(item, out.path(item.name))
    for name_ in TOKENIZER_FILES:
        if (Path(pivot) / name_).exists():
            locations.upload(Path(pivot) / name_, out.path(name_))


def write_merged(checkpoint, base: str, pivot: str, out: io.StageOutput) -> None:
    """A LoRA run's adapter applied to `base`, written tensor by tensor as an ordinary HF model dir
    (`merged/` in the output dir, with the pivot's tokenizer files)."""
    import tempfile

    from fusion_ray.checkpoint.adapter import write_dense

    with checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory(prefix="fusion-ray-merged-") as tmp:
        write_dense(ckpt, tmp, base_dir=base)
        for name_ in TOKENIZER_FILES:
            if (Path(pivot) / name_).exists():
                shutil.copy2(Path(pivot) / name_, Path(tmp) / name_)
        locations.upload(tmp, out.path(MERGED_DIR))


def checkpoint_uri(checkpoint) -> str:
    """The checkpoint's location as a URI when it lives on an object store."""
    fs = checkpoint.filesystem
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(getattr(fs, "type_name", ""), "")
    return f"{scheme}{checkpoint.path}"


