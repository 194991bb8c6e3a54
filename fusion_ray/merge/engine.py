"""The merge engine: check the inputs, plan the output, merge tensor by tensor, write the model dir.

`run_merge(spec, out_dir)` is the whole standalone merge (`fusion-ray merge`): inputs are
checked before any work (architecture, tensor sets, shapes, vocabulary), the output
layout is fixed, tensors are merged by a few threads (each holds its K inputs and one
result: peak ≈ threads × (K + 1) × the largest tensor, no output shard in memory), and
the dir (shards + index, the pivot's config, tokenizer and chat template, a model card,
the merge config) appears atomically. `merge_names` is the unit of work that Ray actors
run on their share of the tensors (fusion_ray.merge.actor).

The layer position t of a gradient is layer_index / (num_layers − 1) (1 for one layer),
and 0 for tensors outside the layers, as in mergekit.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from pathlib import Path

import torch
import yaml

from fusion_ray.checkpoint.adapter import AdapterCheckpoint, config_dir, open_model
from fusion_ray.checkpoint.streaming import (
    DTYPES,
    Checkpoint,
    CheckpointError,
    ShardWriter,
    Slot,
    model_file,
    read_json,
    write_at,
)
from fusion_ray.merge.registry import TensorInputs
from fusion_ray.merge.spec import MergeSpec

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json")
MARKER = "merge_config.yaml"  # written by every merge: what `--force` may replace
MERGE_FILES = frozenset({"config.json", "README.md", MARKER, "model.safetensors", "model.safetensors.index.json",
                         *SIDE_FILES})
OUTPUT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LEFTOVER_GRACE_S = 60.0  # an unlocked partial dir younger than this may belong to a merge just starting


def read_config(model_dir: str) -> dict:
    """The model's config.json (inside the dir, ≤ 64 MiB, a JSON object).

    Raises:
        FileNotFoundError: no config.json.
        CheckpointError: a config.json leading outside the dir, or not a JSON object.
    """
    model_dir = config_dir(model_dir)  # an adapter target: its base's config
    path = model_file(model_dir, "config.json")
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not an HF model dir (no config.json)")
    config = read_json(path, "config", strict=False)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, not an object")
    return config


def num_layers(config: dict) -> int:
    value = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers") or 1
    if type(value) is not int or value < 1:
        raise ValueError(f"config.json: number of layers {str(value)[:40]!r} is not a positive integer")
    return value


def layer_t(name: str, layers: int) -> float:
    """Gradient position of a tensor: its layer index / (layers − 1); 0 outside the layers."""
    match = LAYER.search(name)
    if not match:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def open_inputs(spec: MergeSpec) -> list[Checkpoint | AdapterCheckpoint]:
    """Each input's weights; a LoRA adapter dir reads as its base plus its delta (`checkpoint/adapter.py`),
    and must name the merge's base_model when there is one."""
    return [open_model(path, spec.allow_pickle, expected_base=spec.base_model if path != spec.base_model else None)
            for path in spec.inputs()]


def check_inputs(spec: MergeSpec, ckpts: Sequence[Checkpoint]) -> None:
    """Same architecture, tensor set and shapes (vocab rows may differ with `vocab: common`).

    Raises:
        ValueError: naming the models, the tensor and both shapes.
    """
    paths, pivot = spec.inputs(), spec.inputs().index(spec.pivot())
    configs = [read_config(p) for p in paths]
    ref = configs[pivot]
    for path, cfg in zip(paths, configs, strict=True):
        for key in ("model_type", "architectures"):
            if cfg.get(key) != ref.get(key):
                raise ValueError(f"models have different architectures: {paths[pivot]} has {key}={ref.get(key)}, "
                                 f"{path} has {cfg.get(key)}")
        if cfg.get("vocab_size") != ref.get("vocab_size") and spec.vocab != "common":
            raise ValueError(f"vocab size mismatch: {paths[pivot]} has {ref.get('vocab_size')}, {path} has "
                             f"{cfg.get('vocab_size')}; set `vocab: common` to merge embeddings over the common "
                             "sub-matrix (FuseChat) and keep the pivot's other rows")
    for m in spec.models:
        layers = num_layers(configs[paths.index(m.model)])
        if m.layer_range is not None and tuple(m.layer_range) != (0, layers):
            raise ValueError(f"{m.model}: layer_range {list(m.layer_range)} does not cover its {layers} layers; "
                             "only whole-model slices are supported")
    names = set(ckpts[pivot].tensors)
    for path, ck in zip(paths, ckpts, strict=True):
        missing, extra = sorted(names - set(ck.tensors)), sorted(set(ck.tensors) - names)
        if missing or extra:
            raise ValueError(f"tensor sets differ: {path} lacks {missing[:5]} and has extra {extra[:5]} "
                             f"compared with {paths[pivot]}")
    for name in names:
        shapes = [ck.tensors[name].shape for ck in ckpts]
        for path, shape in zip(paths, shapes, strict=True):
            if shape == shapes[pivot]:
                continue
            vocab_rows = spec.vocab == "common" and len(shape) == len(shapes[pivot]) and \
                shape[1:] == shapes[pivot][1:] and shape[0] == configs[paths.index(path)].get("vocab_size")
            if not vocab_rows:
                raise ValueError(f"shape mismatch for tensor {name}: {paths[pivot]} has {tuple(shapes[pivot])}, "
                                 f"{path} has {tuple(shape)}")


def output_dtype(spec: MergeSpec, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """out_dtype, else the compute dtype (dtype, else the inputs' promoted dtype); non-float kept."""
    if not dtypes[0].is_floating_point:
        return dtypes[0]
    if spec.out_dtype:
        return DTYPES[spec.out_dtype]
    return DTYPES[spec.dtype] if spec.dtype else reduce(torch.promote_types, dtypes)


def apply_method(spec: MergeSpec, xs: list[torch.Tensor], name: str, t: float, seed: int) -> torch.Tensor:
    """Resolve the parameters of tensor `name` at layer position t and run the method's tensor function
    (`fusion_ray.merge.registry`)."""
    b = spec.base_index()
    return spec.method.run(TensorInputs(
        tensors=xs, base=b, shared=spec.shared_params(name, t),
        per_input={i: spec.input_params(i, name, t) for i in range(len(xs)) if i != b},
        name=name, seed=seed, variant=spec.variant, sort=spec.selection == "sort"))


def merge_one(spec: MergeSpec, ckpts: Sequence[Checkpoint], name: str, layers: int, seed: int) -> torch.Tensor:
    """Read the inputs of one tensor, merge them, return the result in its output dtype."""
    raw = [ck.read(name) for ck in ckpts]
    pivot = spec.inputs().index(spec.pivot())
    out_dtype = output_dtype(spec, [r.dtype for r in raw])
    if not raw[0].is_floating_point():
        if any(not torch.equal(r, raw[pivot]) for r in raw):
            raise ValueError(f"non-float tensor {name} differs between inputs; it cannot be merged")
        return raw[pivot]
    dtype = DTYPES[spec.dtype] if spec.dtype else reduce(torch.promote_types, [r.dtype for r in raw])
    xs = [r.to(dtype) for r in raw]
    del raw
    rows = min(x.shape[0] for x in xs)
    if any(x.shape != xs[pivot].shape for x in xs):  # `vocab: common`: merge the shared rows only
        out = xs[pivot].clone()
        out[:rows] = apply_method(spec, [x[:rows] for x in xs], name, layer_t(name, layers), seed)
    else:
        out = apply_method(spec, xs, name, layer_t(name, layers), seed)
    return out.to(out_dtype)


def merge_names(spec: MergeSpec, names: Sequence[str], slots: dict[str, Slot], *, seed: int = 0,
                threads: int = 1, layers: int | None = None) -> int:
    """Merge `names` and write each into its planned slot; returns the bytes written."""
    ckpts = open_inputs(spec)
    layers = layers or num_layers(read_config(spec.pivot()))

    def one(name: str) -> int:
        data = merge_one(spec, ckpts, name, layers, seed).contiguous().reshape(-1).view(torch.uint8)
        write_at(slots[name], data)
        return data.numel()

    largest = max((slots[n].nbytes for n in names), default=0)
    big = [n for n in names if threads <= 1 or slots[n].nbytes * 4 > largest]
    written = sum(one(n) for n in big)  # one at a time, on all torch threads: bounds the peak
    big_set = set(big)
    rest = [n for n in names if n not in big_set]
    if not rest:
        return written
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the many smaller tensors: parallel over tensors, one torch thread each
    try:
        with ThreadPoolExecutor(threads) as pool:
            return written + sum(pool.map(one, rest))
    finally:
        torch.set_num_threads(before)


def plan_output(spec: MergeSpec, ckpts: Sequence[Checkpoint], out_dir: str) -> tuple[ShardWriter, list[str], int]:
    """Check every input and parameter, then lay out the output shards. No tensor is read."""
    check_inputs(spec, ckpts)
    pivot = ckpts[spec.inputs().index(spec.pivot())]
    names = sorted(pivot.tensors, key=lambda n: (pivot.tensors[n].file, pivot.tensors[n].start))
    layers = num_layers(read_config(spec.pivot()))
    b = spec.base_index()
    for name in names:  # resolve every parameter now: a missing one fails before any work
        t = layer_t(name, layers)
        spec.shared_params(name, t)
        for i in range(len(ckpts)):
            if i != b:
                spec.input_params(i, name, t)
    layout = [(n, pivot.tensors[n].shape, output_dtype(spec, [ck.tensors[n].dtype for ck in ckpts])) for n in names]
    return ShardWriter(out_dir, layout, spec.shard_size_mb * 2**20), names, layers


def split_by_bytes(names: Sequence[str], slots: dict[str, Slot], parts: int) -> list[list[str]]:
    """Contiguous runs of names with about equal bytes each (at most `parts`, none empty)."""
    total = sum(slots[n].nbytes for n in names)
    out: list[list[str]] = [[]]
    acc = 0
    for n in names:
        if out[-1] and acc >= total * len(out) / parts and len(out) < parts:
            out.append([])
        out[-1].append(n)
        acc += slots[n].nbytes
    return out


def write_side_files(spec: MergeSpec, out_dir: Path, out_dtype: torch.dtype, seed: int) -> None:
    """The pivot's config (dtype updated), tokenizer and chat template; model card; merge config."""
    pivot = Path(spec.pivot())
    config = read_config(str(pivot))
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(out_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in SIDE_FILES:
        src = model_file(pivot, name)  # a tokenizer file leading outside the pivot's dir is refused
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    dumped = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    (out_dir / "merge_config.yaml").write_text(dumped)
    inputs = "\n".join(f"- `{p}`" + (" (base)" if p == spec.base_model else "") for p in spec.inputs())
    variant = f" (variant `{spec.variant}`)" if spec.merge_method == "sce" else ""
    (out_dir / "README.md").write_text(
        f"---\ntags: [merge, fusion_ray]\n---\n# Merged model\n\nMerged in parameter space by fusion_ray with "
        f"`{spec.merge_method}`{variant}, seed {seed}.\n\n## Inputs\n\n{inputs}\n\nConfig, tokenizer and chat "
        f"template come from `{spec.pivot()}`.\n\n## Method and parameters\n\n```yaml\n{dumped}```\n")


def fill_dir(spec: MergeSpec, out_dir: Path, *, seed: int = 0, threads: int = 1,
             run_parts: Callable[[list[list[str]], dict[str, Slot]], None] | None = None,
             parts: int = 1) -> dict:
    """Merge into an existing empty dir (not atomic: callers publish it). Returns stats.

    Args:
        run_parts: runs the tensor groups elsewhere (Ray actors); None: here, on `threads`.
    """
    started = time.monotonic()
    ckpts = open_inputs(spec)
    writer, names, layers = plan_output(spec, ckpts, str(out_dir))
    if run_parts is None:
        merge_names(spec, names, writer.slots, seed=seed, threads=threads, layers=layers)
    else:
        run_parts(split_by_bytes(names, writer.slots, parts), writer.slots)
    writer.finish()
    floats = [n for n in names if ckpts[0].tensors[n].dtype.is_floating_point]
    out_dtype = output_dtype(spec, [ck.tensors[floats[0]].dtype for ck in ckpts]) if floats else torch.float32
    write_side_files(spec, out_dir, out_dtype, seed)
    return {"tensors": len(names), "bytes": writer.total_bytes, "shards": len(set(writer.weight_map.values())),
            "wall_s": round(time.monotonic() - started, 3)}


def written_by_merge(name: str) -> bool:
    """Whether a merge writes a file of this name into its output dir."""
    return name in MERGE_FILES or OUTPUT_SHARD.fullmatch(name) is not None


def check_out_dir(out_dir: str, force: bool = False) -> Path:
    """The absolute OUT_DIR (symlinks resolved), checked before any work.

    An absent or empty dir is fine. A non-empty one needs `force`, and then must be a previous
    merge's output: it holds `merge_config.yaml` (the marker every merge writes) and only files
    a merge writes (config, tokenizer and chat-template files, README.md, model shards and
    index). Anything else is refused even with `force`: a merge never deletes files it did
    not write.

    Raises:
        FileExistsError: OUT_DIR (or a parent) is a file; or a non-empty dir without `force`;
            or, with `force`, a dir holding files no merge writes. One line naming the path.
    """
    try:
        final = Path(out_dir).expanduser().resolve()
    except (OSError, RuntimeError) as err:
        raise FileExistsError(f"output dir {out_dir}: cannot resolve it ({err})") from None
    for path in (final, *final.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == final else f" (in the output path {final})"
                raise FileExistsError(f"output path {path} exists and is not a directory{where}")
            break
    if not final.is_dir():
        return final
    entries = sorted(e.name for e in final.iterdir())
    if not entries:
        return final
    if not force:
        raise FileExistsError(f"output dir {final} exists and is not empty (use --force to replace it)")
    if not (final / MARKER).is_file():
        raise FileExistsError(f"output dir {final} exists and was not written by a merge (no {MARKER}); "
                              "--force replaces only a previous merge's output: empty it or choose another OUT_DIR")
    foreign = [n for n in entries if not (written_by_merge(n) and (final / n).is_file())]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise FileExistsError(f"output dir {final} exists and holds files a merge does not write "
                              f"({', '.join(foreign[:5])}{more}); --force replaces only a previous merge's "
                              "files: move them or choose another OUT_DIR")
    return final


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on dir `path`, or None (held elsewhere, or no locks here)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_leftovers(final: Path, grace_s: float = LEFTOVER_GRACE_S) -> list[Path]:
    """Remove the `.NAME.partial-XXXXXXXX` / `.NAME.stale-XXXXXXXX` dirs that killed merges into
    `final` left next to it. A running merge holds a flock on its partial dir, so only a dir
    nobody locks, last modified over `grace_s` ago, is removed (the grace covers the instant
    between a merge creating its dir and locking it); where the file system cannot lock a
    dir, nothing is removed. Returns the removed dirs."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:partial|stale)-[0-9a-f]{{8}}")
    removed: list[Path] = []
    try:
        entries = [e for e in final.parent.iterdir() if pattern.fullmatch(e.name)]
    except OSError:
        return removed
    for entry in entries:
        fd = _try_lock(entry)  # not a dir, a symlink, gone, or locked by a live merge: None
        if fd is None:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime >= grace_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        finally:
            os.close(fd)
    return removed


def run_merge(spec: MergeSpec, out_dir: str, *, seed: int = 0, threads: int = 1, force: bool = False,
              **kwargs) -> dict:
    """Merge into `out_dir`, published atomically (temp dir, then rename).

    The result is built in `.NAME.partial-XXXXXXXX` next to OUT_DIR (locked while this merge
    runs) and renamed into place; a previous output being replaced (`force`) is renamed to
    `.NAME.stale-XXXXXXXX` and removed. Leftovers of killed merges into the same OUT_DIR are
    removed first (`remove_leftovers`). With `force`, only a previous merge's output is
    replaced (`check_out_dir`); OUT_DIR is checked again just before it is replaced.

    Raises:
        FileExistsError: see `check_out_dir`.
    """
    final = check_out_dir(out_dir, force)
    remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    lock = _try_lock(tmp)
    try:
        stats = fill_dir(spec, tmp, seed=seed, threads=threads, **kwargs)
        if final.exists():
            check_out_dir(str(final), force)  # what was checked at the start may have changed
            stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return {**stats, "dir": str(final)}
