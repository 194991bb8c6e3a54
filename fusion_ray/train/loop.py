"""The per-worker training loop that Ray Train runs (`train_loop_per_worker`).

Each worker loads the pivot, wraps it for data parallelism, reads its shard of the
fused dataset, and optimises λ·CLM + (1−λ)·fusion (or CLM alone for the `clm_only`
arm) with AdamW, cosine schedule with warmup, gradient accumulation derived from
the config and clipping. Every step's metrics go to `train_log.jsonl` (rank 0); every
`report_every` steps they go to Ray too (a report synchronises the workers, ≈2 s on
this 2-core machine); every `checkpoint_every` optimizer steps (and at the end) rank 0
writes a checkpoint (model, optimizer, scheduler, step) through `ray.train.report`,
from which a restarted run resumes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

from fusion_ray.arrays import rows_of
from fusion_ray.config import FusionConfig
from fusion_ray.demo.assets import resolve as resolve_demo
from fusion_ray.train.batches import collate
from fusion_ray.train.losses import combined_loss

STATE = "train_state.pt"


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return at


def total_steps(cfg: FusionConfig, n_rows: int) -> int:
    per_epoch = max(1, n_rows // cfg.train.global_batch_size)
    return cfg.train.max_steps or per_epoch * cfg.train.epochs


def save_checkpoint(model, optimizer, scheduler, step: int, metrics: dict) -> None:
    import ray.train

    unwrapped = getattr(model, "module", model)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            unwrapped.save_pretrained(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step}, os.path.join(tmp, STATE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = FusionConfig.model_validate(config["cfg"])
    t = cfg.train
    lam = 1.0 if config["arm"] == "clm_only" else t.lambda_clm
    torch.manual_seed(t.seed)
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    path = resolve_demo(cfg.pivot.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=cfg.pivot.trust_remote_code)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
            state = torch.load(os.path.join(ckpt, STATE), weights_only=False)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps = total_steps(cfg, config["rows"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, t.warmup_ratio))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    accum = t.grad_accum_steps()
    shard = ray.train.get_dataset_shard("train")
    step, micro, started, tokens, reached, scored = start, 0, time.monotonic(), 0, 0, 0
    model.train()
    while step < steps:
        for table in shard.iter_batches(batch_size=t.micro_batch_size, batch_format="pyarrow"):
            if step >= steps:
                break
            batch = collate(rows_of(table), tokenizer.pad_token_id, cfg.data.max_length)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out = combined_loss(logits, batch["input_ids"], batch["loss_mask"], batch["topk_ids"],
                                batch["topk_logprobs"], lambda_clm=lam, tail=t.tail, temperature=t.temperature)
            (out["loss"] / accum).backward()
            micro += 1
            tokens += int(batch["attention_mask"].sum())
            reached += int(batch["transferred"].sum())
            scored += len(batch["transferred"])
            if micro % accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = {"step": step, "loss": out["loss"].item(), "clm": out["clm"].item(),
                       "fusion": out["fusion"].item(), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens / max(time.monotonic() - started, 1e-9),
                       "transferred": reached / max(scored, 1)}
            if step % t.checkpoint_every == 0 or step == steps:
                save_checkpoint(model, optimizer, scheduler, step, metrics)
            elif step % t.report_every == 0:
                ray.train.report(metrics)
            if ray.train.get_context().get_world_rank() == 0:
                with open(config["log_path"], "a") as fh:
                    fh.write(json.dumps({"arm": config["arm"], **metrics}) + "\n")
