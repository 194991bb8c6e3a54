"""LoRA adapter targets, read like model dirs: each tensor is the base's plus the adapter's dense delta.

A LoRA adapter dir (peft's `adapter_config.json` + `adapter_model.safetensors`, as `train.peft`
writes it) changes weight W of an adapted layer to W + s · B @ A, with s = alpha / r (alpha / √r
with rsLoRA), A of shape [r, in] and B of shape [out, r] (transposed where the layer stores
W as [in, out]: GPT-2's Conv1D, `fan_in_fan_out`). Its task vector against the base it names
is therefore s · B @ A for every adapted weight and zero elsewhere.

`AdapterCheckpoint` gives the merge engine the same surface as `streaming.Checkpoint`: the base's
tensor index, and `read(name)`, which reads ONE base tensor and adds the delta of that tensor
alone (computed from its two small factors in float32), so an adapter target streams through a
merge tensor by tensor like a dense one and never exists as a whole model. Tensors the adapter
does not touch come back exactly as the base holds them (a zero task vector).

Adapter files are not trusted either: the config must be a LoRA config this reader understands
(no DoRA, no per-module ranks, no full-module copies), every weight name must map to a base
tensor, every A/B pair must be complete and of the config's rank, and the shapes must fit the
base's weight. Each failure is one `CheckpointError` line naming the file.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from fusion_ray.checkpoint.streaming import (
    Checkpoint,
    CheckpointError,
    ShardWriter,
    TensorInfo,
    model_file,
    read_header,
    read_json,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"  # a LoRA target's dense weights (`train.peft.save_merged`), below the adapter
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# adapter_config.json keys whose non-default value changes the update in ways this reader does not apply
UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
               "layers_to_transform": None, "bias": "none"}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The local dir of the base the adapter names (`base_model_name_or_path`, `revision`)."""
    from fusion_ray import locations

    ref, revision = LoraAdapter.read_config(Path(adapter_dir))
    if locations.kind(ref) == "local":
        path = Path(ref).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: names base model {ref}, which is not a "
                                  "model dir (no config.json)")
        return str(path)
    try:
        return locations.local_dir(ref, revision=revision)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: names base model {ref}, which cannot be "
                              f"found ({err})") from None


class LoraAdapter:
    """A validated LoRA adapter dir: scale, factor layout, and the base tensor each pair adapts."""

    def __init__(self, adapter_dir: str | Path):
        self.dir = Path(adapter_dir)
        self.config_path = model_file(self.dir, ADAPTER_CONFIG)
        config = self._config(self.config_path)
        self.rank, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / math.sqrt(self.rank) if config.get("use_rslora") else alpha / self.rank
        self.transposed = bool(config.get("fan_in_fan_out"))
        self.base_ref = config.get("base_model_name_or_path")
        self.file = str(model_file(self.dir, ADAPTER_WEIGHTS))
        if not Path(self.file).is_file():
            raise CheckpointError(f"{self.file}: missing (an adapter dir holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        header = read_header(self.file)
        factors: dict[str, dict[str, TensorInfo]] = {}
        for key, info in header.items():
            match = KEY.match(key)
            if match is None:
                raise CheckpointError(f"{self.file}: tensor {key!r} is not a LoRA factor "
                                      "(base_model.model.<module>.lora_A/lora_B.weight); embedding adapters and "
                                      "saved full modules are not supported")
            factors.setdefault(f"{match['module']}.weight", {})[match["which"]] = info
        if not factors:
            raise CheckpointError(f"{self.file}: holds no LoRA factors")
        for name, pair in factors.items():
            if set(pair) != {"A", "B"}:
                lacking = "B" if "A" in pair else "A"
                raise CheckpointError(f"{self.file}: {name} has no lora_{lacking} factor")
            a, b = pair["A"].shape, pair["B"].shape
            if len(a) != 2 or len(b) != 2 or a[0] != self.rank or b[1] != self.rank:
                raise CheckpointError(f"{self.file}: {name}: factors A {list(a)} and B {list(b)} are not of rank "
                                      f"{self.rank}, the r of {self.config_path} (rank mismatch)")
        self.factors = factors

    @staticmethod
    def _config(path: Path) -> dict:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        config = read_json(path, "adapter config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        if config.get("peft_type") != "LORA":
            raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
        r, alpha = config.get("r"), config.get("lora_alpha")
        if type(r) is not int or r < 1:
            raise CheckpointError(f"{path}: r {r!r} is not a positive integer")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise CheckpointError(f"{path}: lora_alpha {alpha!r} is not a number")
        for key, default in UNSUPPORTED.items():
            if config.get(key, default) not in (default, None, {}, []):
                raise CheckpointError(f"{path}: {key} {json.dumps(config[key])[:60]} is not supported "
                                      f"(only plain LoRA: {key} must be {json.dumps(default)})")
        if not isinstance(config.get("base_model_name_or_path"), str) or not config["base_model_name_or_path"]:
            raise CheckpointError(f"{path}: base_model_name_or_path does not name the base model")
        return config

    @classmethod
    def read_config(cls, adapter_dir: Path) -> tuple[str, str | None]:
        config = cls._config(model_file(adapter_dir, ADAPTER_CONFIG))
        revision = config.get("revision")
        return config["base_model_name_or_path"], revision if isinstance(revision, str) else None

    def check_base(self, base: Checkpoint, base_dir: str) -> None:
        """Every adapted weight exists in the base with the shape the factors give."""
        for name, pair in self.factors.items():
            info = base.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.file}: adapts {name}, which the base model {base_dir} does not have "
                                      "(an adapter trained on another base?)")
            out, inp = pair["B"].shape[0], pair["A"].shape[1]
            want = (inp, out) if self.transposed else (out, inp)
            if tuple(info.shape) != want:
                raise CheckpointError(f"{self.file}: {name}: factors give a {list(want)} update, but the base "
                                      f"model {base_dir} holds it as {list(info.shape)} (an adapter trained on "
                                      "another base?)")

    def delta(self, name: str) -> torch.Tensor | None:
        """s · B @ A for the weight `name` (float32, the base's layout), None when not adapted."""
        pair = self.factors.get(name)
        if pair is None:
            return None
        from safetensors import safe_open

        with safe_open(self.file, "pt") as f:
            prefix = f"base_model.model.{name.removesuffix('.weight')}"
            a = f.get_tensor(f"{prefix}.lora_A.weight").to(torch.float32)
            b = f.get_tensor(f"{prefix}.lora_B.weight").to(torch.float32)
        d = (b @ a) * self.scale
        return d.T if self.transposed else d


class AdapterCheckpoint:
    """An adapter target with `streaming.Checkpoint`'s surface: the base's tensors plus the adapter's delta.

    Args:
        base_dir: the base's local dir (default: the one the adapter names).
        expected_base: when given, the adapter must name this dir (the merge's base_model).
    """

    def __init__(self, adapter_dir: str, base_dir: str | None = None, allow_pickle: bool = False,
                 expected_base: str | None = None):
        self.dir = Path(adapter_dir)
        self.adapter = LoraAdapter(adapter_dir)
        self.base_dir = base_dir or adapter_base(adapter_dir)
        if expected_base is not None and Path(self.base_dir).resolve() != Path(expected_base).resolve():
            raise CheckpointError(f"{self.adapter.config_path}: the adapter was trained on {self.adapter.base_ref} "
                                  f"({self.base_dir}), but this merge's base_model is {expected_base}")
        self.base = Checkpoint(self.base_dir, allow_pickle)
        self.adapter.check_base(self.base, self.base_dir)
        self.tensors = self.base.tensors

    def read(self, name: str) -> torch.Tensor:
        x = self.base.read(name)
        d = self.adapter.delta(name)
        if d is None:
            return x
        return x.to(torch.promote_types(x.dtype, torch.float32)) + d


def open_model(path: str, allow_pickle: bool = False, expected_base: str | None = None):
    """A model dir's `Checkpoint`, or an adapter dir's `AdapterCheckpoint`."""
    if is_adapter_dir(path):
        return AdapterCheckpoint(path, allow_pickle=allow_pickle, expected_base=expected_base)
    return Checkpoint(path, allow_pickle)


def config_dir(path: str) -> str:
    """Where a model's config.json lives: the dir itself, or an adapter's base."""
    return adapter_base(path) if is_adapter_dir(path) else path


def write_dense(adapter_dir: str, out_dir: str, base_dir: str | None = None,
                shard_bytes: int = 2000 * 2**20) -> dict:
    """base + adapter as an ordinary HF model dir (safetensors in the base's dtypes, the base's
    config and generation config), written one tensor at a time."""
    ck = AdapterCheckpoint(adapter_dir, base_dir)
    names = sorted(ck.tensors, key=lambda n: (ck.tensors[n].file, ck.tensors[n].start))
    writer = ShardWriter(out_dir, [(n, ck.tensors[n].shape, ck.tensors[n].dtype) for n in names], shard_bytes)
    for name in names:
        writer.write(name, ck.read(name).to(ck.tensors[name].dtype))
    writer.finish()
    for side in ("config.json", "generation_config.json"):
        src = model_file(ck.base_dir, side)
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / side)
    return {"tensors": len(names), "adapted": len(ck.adapter.factors), "bytes": writer.total_bytes}


def dense_start(model_dir: str) -> str:
    """The dense model a later stage starts from: `model_dir`, or a LoRA target's `merged/` weights.

    Raises:
        ValueError: a LoRA target trained without `save_merged`.
    """
    from fusion_ray import io

    if not io.exists(f"{model_dir.rstrip('/')}/{ADAPTER_CONFIG}"):
        return model_dir
    merged = f"{model_dir.rstrip('/')}/{MERGED_DIR}"
    if not io.exists(f"{merged}/config.json"):
        raise ValueError(f"{model_dir} is a LoRA adapter without dense weights; a stage that starts from it needs "
                         "them: set train.peft.save_merged: true")
    return merged
