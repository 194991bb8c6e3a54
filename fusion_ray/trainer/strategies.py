"""Data-parallel strategies for the training loop: `ddp` and `deepspeed` (ZeRO-2/3).

Both present the same small surface to the loop — `model`, `backward(loss)`,
`step()` (one optimizer step: clip, step, schedule, zero), `lr()`, `save(dir)`,
`load(dir)` — so the loop does not care which one runs.

Checkpoints hold an ordinary HF model dir (full float32 weights, written by rank 0)
plus the strategy's own resume state: `train_state.pt` for DDP, DeepSpeed's
partitioned `ds/` checkpoint (every rank writes its optimizer partition; Ray Train
gathers the files of all ranks into one checkpoint dir) for ZeRO. `fusion_ray.json`
names the run's fingerprint, strategy, world size and step, so a checkpoint of
another config is refused with both hashes named.

DeepSpeed on CPU (gloo): DeepSpeed's fused Adam is a JIT build (minutes) — we hand it a
`torch.optim.AdamW` instead (`zero_allow_untested_optimizer`, and
`zero_force_ds_cpu_optimizer: false` for CPU offload); its shared-memory comm op is
another JIT build (minutes, gigabytes) that gloo does not need, so it is switched off on CPU
(measured: docs/findings.md#the-training-loop-and-deepspeed-on-cpu).
"""

from __future__ import annotations

import json
import math
import os

import torch

from fusion_ray.trainer import lora

STATE = "train_state.pt"
META = "fusion_ray.json"
DS_TAG = "ds"


def read_meta(path: str) -> dict | None:
    meta = os.path.join(path, META)
    if not os.path.exists(meta):
        return None
    with open(meta) as fh:
        return json.load(fh)


def check_meta(path: str, fingerprint: str, strategy: str, world_size: int) -> dict:
    """The checkpoint at `path` must come from this run's config, strategy and world size."""
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"{path} is not a fusion_ray training checkpoint (no {META})")
    if meta["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} was written by a run with config hash {meta['fingerprint']}, "
                         f"but this run's config hash is {fingerprint}: refusing to resume from it")
    if meta["strategy"] != strategy or (strategy == "deepspeed" and meta["world_size"] != world_size):
        raise ValueError(f"checkpoint {path} was written by strategy {meta['strategy']} on {meta['world_size']} "
                         f"worker(s); this run uses {strategy} on {world_size}")
    return meta


def _write_meta(path: str, fingerprint: str, strategy: str, world_size: int, step: int) -> None:
    with open(os.path.join(path, META), "w") as fh:
        json.dump({"fingerprint": fingerprint, "strategy": strategy, "world_size": world_size, "step": step}, fh)


def trainable(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: all of them, or LoRA's adapters alone."""
    return [p for p in model.parameters() if p.requires_grad]


def lr_lambda(total_steps: int, warmup_ratio: float):
    """The schedule's factor at each step: linear warmup over `warmup_ratio` of the steps, then cosine to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return at


class DDP:
    name = "ddp"

    def __init__(self, model, t, lr_fn, fingerprint: str, rank: int, world_size: int):
        import ray.train.torch

        self._setup(ray.train.torch.prepare_model(model), t, lr_fn, t.grad_accum_steps(), fingerprint, rank,
                    world_size)

    def _setup(self, model, t, lr_fn, accum: int, fingerprint: str, rank: int, world_size: int) -> None:
        self.t, self.fingerprint, self.rank, self.world_size = t, fingerprint, rank, world_size
        self.model = model
        self.optimizer = torch.optim.AdamW(trainable(self.model), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.accum = accum

    @property
    def module(self):
        return getattr(self.model, "module", self.model)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: str, step: int) -> bool:
        if self.rank != 0:
            return False
        if lora.is_peft(self.module):  # LoRA: the adapter only (the base is the pivot's, unchanged)
            lora.save_adapter(self.module, path)
        else:
            self.module.save_pretrained(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": step}, os.path.join(path, STATE))
        _write_meta(path, self.fingerprint, self.name, self.world_size, step)
        return True

    def load(self, path: str) -> int:
        from safetensors.torch import load_file

        check_meta(path, self.fingerprint, self.name, self.world_size)
        if lora.is_peft(self.module):
            lora.load_adapter_weights(self.module, path)
            return self._load_state(path)
        weights = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                weights.update(load_file(os.path.join(path, f)))
        missing, unexpected = self.module.load_state_dict(weights, strict=False)
        tied = set(getattr(self.module, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied - {"lm_head.weight"}:
            raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
        return self._load_state(path)

    def _load_state(self, path: str) -> int:
        state = torch.load(os.path.join(path, STATE), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])


class Local(DDP):
    """One process, no Ray: the `ddp` strategy's optimizer, schedule, accumulation and clipping,
    for runs outside a Ray Train worker (bench/quality.py). `t` needs `lr`, `weight_decay` and
    `grad_clip`; `accum` micro-batches make one step."""

    name = "local"

    def __init__(self, model, t, lr_fn, accum: int = 1):
        self._setup(model, t, lr_fn, accum, "", 0, 1)


def deepspeed_config(t) -> dict:
    zero: dict = {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps(),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def import_deepspeed(t):
    """DeepSpeed, for the accelerator `t.use_gpu` names (set before its first import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t.use_gpu else "cpu")
    import deepspeed

    if not t.use_gpu:  # gloo does all the communication; skip the shm op's JIT build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeed:
    name = "deepspeed"

    def __init__(self, model, t, lr_fn, fingerprint: str, rank: int, world_size: int):
        deepspeed = import_deepspeed(t)
        self.t, self.fingerprint, self.rank, self.world_size = t, fingerprint, rank, world_size
        deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo", auto_mpi_discovery=False)
        optimizer = torch.optim.AdamW(trainable(model), lr=t.lr, weight_decay=t.weight_decay)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(t),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))

    @property
    def module(self):
        return self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by the accumulation steps itself
        self.model.step()          # a no-op for the optimizer until the accumulation boundary

    def step(self) -> None:
        pass  # the engine stepped the optimizer and the schedule at the boundary

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full float32 weights (the optimizer's master copy) gathered onto every rank."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if not param.requires_grad:  # LoRA's frozen base: not trained, not saved
                continue
            full = safe_get_full_fp32_param(param)  # collective: every rank calls it
            if self.rank == 0:
                out[name] = full.detach().to("cpu", torch.float32).clone()
        return out

    def save(self, path: str, step: int) -> bool:
        weights = self.full_state_dict()
        self.model.save_checkpoint(os.path.join(path, "ds"), tag=DS_TAG, client_state={"step": step},
                                   save_latest=False)
        if self.rank == 0 and lora.is_peft(self.module):
            lora.save_adapter(self.module, path, state_dict=weights)
            _write_meta(path, self.fingerprint, self.name, self.world_size, step)
        elif self.rank == 0:
            self.module.save_pretrained(path, state_dict=weights)
            config_path = os.path.join(path, "config.json")  # the weights are the float32 master copy,
            with open(config_path) as fh:                    # whatever dtype the engine computed in
                config = json.load(fh)
            config["dtype"] = "float32"
            with open(config_path, "w") as fh:
                json.dump(config, fh, indent=2)
            _write_meta(path, self.fingerprint, self.name, self.world_size, step)
        return True  # every rank contributes its own partition files

    def load(self, path: str) -> int:
        check_meta(path, self.fingerprint, self.name, self.world_size)
        _, client = self.model.load_checkpoint(os.path.join(path, "ds"), tag=DS_TAG)
        if client is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint at {path}/ds")
        return int(client["step"])


STRATEGIES = {"ddp": DDP, "deepspeed": DeepSpeed}
