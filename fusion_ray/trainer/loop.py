"""The per-worker training loop that Ray Train runs (`train_loop_per_worker`).

Each worker loads the pivot, wraps it with the configured strategy (`ddp`, or
`deepspeed` ZeRO-2/3, see `strategies.py`), reads its shard of the fused dataset, and
optimises λ·CLM + (1−λ)·fusion (or CLM alone for the `clm_only` arm; the chunked loss
writes its gradient over the logits) with AdamW, cosine schedule with warmup, gradient
accumulation derived from the config and clipping. Every step's metrics go to
`train_log.jsonl` (rank 0); every `report_every` steps they go to Ray too (a report
synchronises the workers, which takes seconds on a small CPU machine:
docs/findings.md#the-training-loop-and-deepspeed-on-cpu); every `checkpoint_every`
optimizer steps (and at the end) the workers write a checkpoint (HF weights, optimizer,
schedule, step, and rank 0's log so far) through `ray.train.report`. A restarted run
resumes from it: same step, same schedule, the micro-batches consumed before it skipped,
the log taken from the checkpoint (so it ends at the checkpoint's step).

The log never lives on a worker's local disk only: rank 0 keeps it in memory, puts it in
every checkpoint (Ray Train stores checkpoints under the run's `storage_path`: the workdir,
local or an object store) and republishes it to `log_path` (in the stage's output dir, local
or an object store) at every report, so it can be followed while the run goes on.

With `train.tracking`, rank 0 also sends every step's metrics to MLflow or W&B (`tracking.py`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from fusion_ray import io, locations
from fusion_ray.arrays import rows_of
from fusion_ray.config import FusionConfig
from fusion_ray.schema import SchemaError
from fusion_ray.trainer import lora
from fusion_ray.trainer.batches import collate, collate_packed
from fusion_ray.trainer.load import load_model
from fusion_ray.trainer.losses import batch_loss
from fusion_ray.trainer.objective import Distill, Preference
from fusion_ray.trainer.objective import from_wire as objective_from_wire
from fusion_ray.trainer.order import RowPlan, rank_batches
from fusion_ray.trainer.strategies import STRATEGIES, lr_lambda
from fusion_ray.trainer.tracking import Tracker


def total_steps(cfg: FusionConfig, n_rows: int, plan: RowPlan | None = None) -> int:
    """Optimizer steps of the run: `max_steps`, else ⌊rows / global_batch_size⌋ per epoch (at least 1).

    With packing (`plan` carries the rows' token counts), packed rows take the place of rows: each
    epoch counts its own ⌊packed rows / global_batch_size⌋, its packing computed from the seeded
    row order as every rank computes it (`RowPlan.packed_rows`).
    """
    if plan is not None and plan.lengths is not None and not cfg.train.max_steps:
        return sum(max(1, plan.packed_count(e, cfg.data.max_length) // cfg.train.global_batch_size)
                   for e in range(cfg.train.epochs))
    per_epoch = max(1, n_rows // cfg.train.global_batch_size)
    return cfg.train.max_steps or per_epoch * cfg.train.epochs


LOG_NAME = "train_log.jsonl"


class TrainLog:
    """Rank 0's per-step log: in memory, in every checkpoint, republished to `path` (local or URI)."""

    def __init__(self, path: str, lines: list[str] | None = None):
        self.path, self.lines = path, list(lines or [])

    @classmethod
    def from_checkpoint(cls, path: str, ckpt_dir: str | None, step: int, checkpoint_path: str | None) -> TrainLog:
        """A fresh log, or the one a checkpoint carries plus a `restarted` event."""
        if ckpt_dir is None:
            return cls(path)
        saved = Path(ckpt_dir) / LOG_NAME
        lines = saved.read_text().splitlines(keepends=True) if saved.is_file() else []
        lines = [line for line in lines if json.loads(line).get("step", 0) <= step]
        lines.append(json.dumps({"event": "restarted", "step": step, "checkpoint": checkpoint_path}) + "\n")
        return cls(path, lines)

    def add(self, record: dict) -> None:
        self.lines.append(json.dumps(record) + "\n")

    def text(self) -> str:
        return "".join(self.lines)

    def publish(self) -> None:
        io.write_bytes_atomic(self.path, self.text().encode())


def save_checkpoint(strategy, step: int, metrics: dict, log: TrainLog | None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        wrote = strategy.save(tmp, step)
        if log is not None and wrote:
            Path(tmp, LOG_NAME).write_text(log.text())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
    if log is not None:
        log.publish()


class FusionObjective:
    """`objective.Distill`: λ·CLM + (1−λ)·fusion on rows of the FUSED schema.

    Its metrics are the optimizer step's (the micro-batches since the last `metrics` call): the
    CLM and fusion terms of the step's last micro-batch, and the share of the step's scored
    positions a source's distribution reached (`transferred`). CLM alone (λ = 1) has neither a
    fusion term nor a transfer to report."""

    def __init__(self, spec: Distill, cfg: FusionConfig, pad_id: int, device):
        self.cfg, self.lam, self.pad_id, self.device = cfg, spec.lambda_clm, pad_id, device
        self.reached = self.scored = 0

    def loss(self, model, rows: list[dict]) -> dict:
        t = self.cfg.train
        if t.packing:  # rows of packed conversations, with the position ids and masks that keep them apart
            batch = collate_packed(rows, self.pad_id, self.cfg.data.max_length)
        else:
            batch = collate(rows, self.pad_id, self.cfg.data.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = batch_loss(model, batch, lam=self.lam, tail=t.tail, temperature=t.temperature,
                         fusion_positions=t.fusion_positions, loss_from=t.loss_from,
                         chunk_bytes=t.loss_chunk_mb << 20 if t.loss_chunk_mb else None)
        self.observe(batch["transferred"])
        return {**out, "tokens": int(batch["attention_mask"].sum())}

    def observe(self, transferred) -> None:
        """Count a micro-batch's scored positions and those a source reached."""
        self.reached += int(transferred.sum())
        self.scored += len(transferred)

    def metrics(self, out: dict) -> dict:
        """The step's figures; starts the next step's count."""
        if self.lam == 1.0:
            figures = {"clm": out["clm"].item()}
        else:
            figures = {"clm": out["clm"].item(), "fusion": out["fusion"].item(),
                       "transferred": self.reached / max(self.scored, 1)}
        self.reached = self.scored = 0
        return figures


class PreferenceObjective:
    """`objective.Preference`: a preference loss on rows of chosen/rejected tokens with the reference
    model's log-probs precomputed: no reference model in training memory."""

    def __init__(self, spec: Preference, cfg: FusionConfig, pad_id: int, device):
        self.spec, self.pad_id, self.device = spec, pad_id, device

    def loss(self, model, rows: list[dict]) -> dict:
        from fusion_ray.trainer.batches import collate_pairs
        from fusion_ray.trainer.preference import preference_loss, sequence_logps

        d = self.spec
        batch = {k: v.to(self.device) for k, v in collate_pairs(rows, self.pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, lengths = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        n = len(rows)
        loss, stats = preference_loss(logps[:n], logps[n:], batch["ref_chosen"], batch["ref_rejected"],
                                      lengths[:n], lengths[n:], kind=d.loss, beta=d.beta,
                                      label_smoothing=d.label_smoothing, gamma_beta_ratio=d.gamma_beta_ratio,
                                      nll_weight=d.nll_weight)
        return {"loss": loss, **stats, "tokens": int(batch["attention_mask"].sum())}

    def metrics(self, out: dict) -> dict:
        return {k: float(v.mean()) for k, v in out.items() if k not in ("loss", "tokens")}


OBJECTIVES = {Distill: FusionObjective, Preference: PreferenceObjective}


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from fusion_ray import progress
    from fusion_ray import tokenizer as tokenizers

    progress.quiet_train_worker()  # off a terminal, no Ray Train line per report
    cfg = FusionConfig.from_wire(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    # the weights trained: the pivot's, or (implicit fusion's dpo) the model `init_path` names
    start_ref = config.get("init_path") or cfg.pivot.path
    start_revision = None if config.get("init_path") else cfg.pivot.revision
    path = locations.local_dir(start_ref, revision=start_revision)
    tokenizer = tokenizers.for_model(cfg.pivot)  # `pivot.tokenizer` when set, with its trust_remote_code
    if t.peft is not None and lora.is_adapter_dir(path):
        raise ValueError(f"{path} is a LoRA adapter, not a model to start from: train it with "
                         "train.peft.save_merged: true and start from its merged/ dir")
    quantized = lora.quantized_load_kwargs(t.peft, t.use_gpu) if t.peft is not None else {}
    # in the training dtype, and under ZeRO-3 built partitioned (trainer/load.py); QLoRA's 4-bit base
    # is read whole by from_pretrained (it trains under DDP only)
    model = load_model(path, t, trust_remote_code=cfg.pivot.trust_remote_code, **quantized)
    if t.gradient_checkpointing:  # before the strategy wraps the model (DeepSpeed, DDP)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.peft is not None:  # LoRA: adapters on the frozen base, before the strategy wraps the model
        model = lora.apply_lora(model, t.peft, base_ref=start_ref, revision=start_revision,
                                gradient_checkpointing=t.gradient_checkpointing)
    plan, epoch = RowPlan.from_wire(config["plan"]), 0  # the rows (their count read from the files' footers)
    # packing (fused/SFT rows only): micro-batches of packed rows of up to max_length tokens
    capacity = cfg.data.max_length if plan.lengths is not None else None
    if t.packing and capacity is None and rank == 0:
        print("[train] train.packing applies to fused/SFT rows; these preference pairs train unpacked", flush=True)
    steps = total_steps(cfg, plan.rows, plan)
    strategy = STRATEGIES[t.strategy](model, t, lr_lambda(steps, t.warmup_ratio), config["fingerprint"], rank, world)
    start, log = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            start = strategy.load(ckpt)
            if rank == 0:
                log = TrainLog.from_checkpoint(config["log_path"], ckpt, start, checkpoint.path)
    if rank == 0 and log is None:
        log = TrainLog(config["log_path"])
    tracker = Tracker.start(cfg, config.get("tracking"), rank, log, start)  # rank 0; a no-op when off
    accum = t.grad_accum_steps()
    skip = start * accum  # micro-batches this worker consumed before the checkpoint
    step, micro, started, tokens = start, 0, time.monotonic(), 0
    last = started
    device = next(strategy.module.parameters()).device
    spec = objective_from_wire(config["objective"])
    objective = OBJECTIVES[type(spec)](spec, cfg, tokenizer.pad_token_id, device)
    strategy.model.train()
    while step < steps:
        batches = 0
        for table in rank_batches(plan, epoch, t.micro_batch_size, rank, world, capacity):
            batches += 1
            if step >= steps:
                break
            if skip:
                skip -= 1
                continue
            rows = rows_of(table)
            try:
                out = objective.loss(strategy.model, rows)
            except KeyError as err:  # a row without a column the objective reads: bad input, not a fault
                if rows and err.args and err.args[0] not in rows[0]:
                    raise SchemaError(f"training rows have no column {err.args[0]!r} (columns: "
                                      f"{', '.join(rows[0])}): {plan.files[0].rsplit('/', 2)[-2]} is not "
                                      f"rows of this stage's input schema") from err
                raise
            strategy.backward(out["loss"])
            micro += 1
            tokens += out["tokens"]
            if micro % accum:
                continue
            strategy.step()
            step += 1
            now = time.monotonic()
            step_s, last = now - last, now
            metrics = {"step": step, "loss": out["loss"].item(), **objective.metrics(out), "lr": strategy.lr(),
                       "tokens_per_s": tokens / max(now - started, 1e-9), "step_s": step_s}
            if log is not None:
                log.add({"arm": config["arm"], "strategy": t.strategy, **metrics})
            tracker.log_step(metrics)
            if step % t.checkpoint_every == 0 or step == steps:
                save_checkpoint(strategy, step, metrics, log)
            elif step % t.report_every == 0:
                ray.train.report(metrics)
                if log is not None:
                    log.publish()
                    # the target's name (computing, clm_only, sft, …): several arms of one kind train at once
                    target = config.get("name") or config["arm"]
                    print(f"[train] {target} step {step}/{steps} loss {metrics['loss']:.4f} "
                          f"{metrics['tokens_per_s']:.0f} tokens/s", flush=True)
        if not batches:
            raise ValueError(f"{plan.rows} training rows cannot fill one micro-batch of {t.micro_batch_size} "
                             f"{'packed rows' if capacity else 'rows'} on each of {world} workers")
        epoch += 1
    tracker.finish(step=step)
