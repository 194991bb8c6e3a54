"""The model a training rank starts from: read in the training dtype and, under DeepSpeed ZeRO-3,
built partitioned, so no rank ever holds the whole model in float32.

- Training dtype (`training_dtype`): bf16 when DeepSpeed trains in bf16, float32 otherwise.
  DeepSpeed's bf16 engine casts the module to bf16 and its ZeRO optimizer builds the float32
  master copy of each rank's partition from those bf16 weights, so reading bf16 straight from the
  checkpoint gives the same master weights as reading float32 and letting the engine cast (and a
  bf16 checkpoint, the usual case, was only ever up-cast). DDP trains in float32 (no autocast, a
  float32 AdamW), so it reads float32.
- ZeRO-3 (`load_partitioned`): the model is constructed inside DeepSpeed's `zero.Init`, which
  partitions every parameter as its module is built (no weight initialisation: the values come
  from the checkpoint), then each rank copies only its own slice of each tensor out of the
  safetensors files (`safe_open` slices of rows, the flat range DeepSpeed's partition covers).
  A rank reads and holds about 1/ranks of the weights, in the training dtype; the full tensor
  exists nowhere. Checkpoints whose keys do not name the model's parameters (a legacy layout
  that transformers renames on load) fall back to the full load, with a line saying so.
"""

from __future__ import annotations

import json
import math
import os

import torch


def training_dtype(t) -> torch.dtype:
    """The dtype the weights are read in: bf16 under DeepSpeed with `train.bf16`, else float32."""
    return torch.bfloat16 if t.strategy == "deepspeed" and t.bf16 else torch.float32


def partitioned(t) -> bool:
    """Whether the model is built partitioned (DeepSpeed ZeRO-3)."""
    return t.strategy == "deepspeed" and t.zero_stage == 3


def load_model(path: str, t, *, trust_remote_code: bool = False, log=print, **quantized):
    """The causal LM at the HF dir `path` as training rank's copy for the settings `t` (`train.*`);
    `quantized`: from_pretrained's arguments of a quantized base (QLoRA), which it reads whole."""
    from transformers import AutoModelForCausalLM

    dtype = training_dtype(t)
    if partitioned(t) and not quantized:
        model = load_partitioned(path, t, dtype, trust_remote_code=trust_remote_code, log=log)
        if model is not None:
            return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code, **quantized)


def checkpoint_files(path: str) -> dict[str, str] | None:
    """{tensor name: safetensors file} of the HF dir `path`; None when it has no safetensors weights."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            return {k: os.path.join(path, f) for k, f in json.load(fh)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def checkpoint_key(name: str, keys, prefix: str) -> str | None:
    """The checkpoint's name of the model's parameter `name` (also without the base model prefix,
    as GPT-2's original checkpoints store them)."""
    if name in keys:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in keys:
        return name[len(prefix) + 1:]
    return None


def read_flat(handle, key: str, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the flattened tensor `key`, reading only the rows that hold them."""
    piece = handle.get_slice(key)
    shape = piece.get_shape()
    if len(shape) < 2:
        return handle.get_tensor(key).reshape(-1)[lo:hi]
    row = math.prod(shape[1:])
    first, last = lo // row, -(-hi // row)
    block = piece[first:last].reshape(-1)
    return block[lo - first * row:hi - first * row]


def load_partitioned(path: str, t, dtype: torch.dtype, *, trust_remote_code: bool = False, log=print):
    """The model built inside `zero.Init` with each rank's partition read from the checkpoint;
    None when the checkpoint's keys do not cover the model's parameters (the caller loads it whole)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from fusion_ray.trainer.strategies import deepspeed_config, import_deepspeed

    files = checkpoint_files(path)
    if files is None:
        return None
    deepspeed = import_deepspeed(t)
    deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo", auto_mpi_discovery=False)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    # the partitions' dtype comes from the config's bf16 setting (an explicit `dtype=` is ignored on
    # CPU accelerators in favour of bf16 when fp16 is unsupported, so it is not passed)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=deepspeed_config(t)):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied head shares the embedding's partition (from_pretrained ties here too)
    prefix = getattr(model, "base_model_prefix", "")
    params = list(model.named_parameters())
    where = {name: checkpoint_key(name, files, prefix) for name, _ in params}
    missing = [name for name, key in where.items() if key is None]
    if missing:
        log(f"[train] {path}: the checkpoint does not name {len(missing)} parameter(s) of the model "
            f"(e.g. {missing[0]}); loading it whole instead of partitioned")
        del model
        return None
    handles = {}
    try:
        with torch.no_grad():
            for name, param in params:
                key = where[name]
                handle = handles.get(files[key]) or handles.setdefault(files[key], safe_open(files[key], "pt"))
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != tuple(param.ds_shape):
                    raise ValueError(f"{path}: {key} has shape {list(shape)} in the checkpoint but the model's "
                                     f"{name} has {list(param.ds_shape)}")
                part = param.ds_tensor
                size = part.ds_numel
                lo = torch.distributed.get_rank(group=param.ds_process_group) * size
                hi = min(lo + size, param.ds_numel)
                n = max(hi - lo, 0)
                if n:
                    part[:n].copy_(read_flat(handle, key, lo, hi))
                part[n:].zero_()  # DeepSpeed's padding of the last partition
            buffers = {name: buf for name, buf in model.named_buffers()}
            for name, buf in buffers.items():  # persistent buffers are not partitioned: read whole
                key = checkpoint_key(name, files, prefix)
                if key is not None:
                    handle = handles.get(files[key]) or handles.setdefault(files[key], safe_open(files[key], "pt"))
                    buf.copy_(handle.get_tensor(key))
    finally:
        handles.clear()
    return model.eval()  # as from_pretrained returns it (the loop switches to train mode itself)
