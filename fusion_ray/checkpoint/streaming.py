"""Tensor-at-a-time checkpoint I/O: lazy (sharded) safetensors reads, pre-planned sharded writes.

`Checkpoint` indexes a model dir's safetensors headers (single file or sharded with an
index) and reads ONE tensor on demand with `pread` into a fresh buffer: no mmap, so a
merge holds only the tensors it is working on. `.bin` checkpoints are refused unless
the caller opts in (`allow_pickle`), and are then loaded with `weights_only`.

Model files are not trusted. Every file a model dir names (its index's `weight_map`
values, the single weights file, config and tokenizer files) must lie inside the dir
(`model_file`), and every safetensors header is validated against its file before any
tensor is read (`parse_header`), with the rules of the safetensors library: the tensors'
byte ranges tile the data section exactly. Whatever fails raises `CheckpointError`, one
line naming the file (and the tensor).

`ShardWriter` plans the output layout (names, shapes, dtypes → shard files and byte
offsets) before any tensor is merged, writes every shard's header up front, then
`pwrite`s each merged tensor straight to its offset: no output shard is held in memory,
and several processes may fill disjoint tensors of the same files.
Local paths only. This module imports torch and nothing heavier.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's bound
MAX_JSON_BYTES = 64 * 2**20  # an index, config or tokenizer config read whole
MAX_DIM = 2**63 - 1  # a torch size


class CheckpointError(ValueError):
    """A model dir or weights file that cannot be trusted (one line naming the file and the tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _loads(path: str, blob: bytes, what: str, strict: bool = True) -> object:
    """JSON from UTF-8 bytes; `strict`: no duplicate keys, no NaN/Infinity. Failures: one CheckpointError line."""

    def constant(name: str) -> None:
        raise CheckpointError(f"non-standard JSON constant {name}")

    extra = {"object_pairs_hook": _no_duplicates, "parse_constant": constant} if strict else {}
    try:
        return json.loads(blob.decode("utf-8"), **extra)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {what}: {err}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nests too deeply") from None
    except ValueError as err:  # JSONDecodeError, oversized integer literals
        first = (str(err).splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path}: {what} is not valid JSON ({first})") from None


def _show(x: object, limit: int = 60) -> str:
    """A short one-line repr of an untrusted JSON value for an error message."""
    try:
        text = repr(x)
    except RecursionError:
        text = f"<deeply nested {type(x).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool, not float


def parse_header(path: str, f: BinaryIO, file_size: int) -> dict[str, TensorInfo]:
    """Name → TensorInfo from the safetensors file open as `f` (`file_size` bytes), validated.

    Reads the 8-byte length and the header only (O(header)); checks it as the safetensors
    library does: length ≤ 100 MB and within the file; a JSON object whose `__metadata__`,
    if present, maps str → str; each tensor a known dtype, a shape of non-negative ints and
    `data_offsets` [begin, end] with end − begin = elements × itemsize; the tensors' byte
    ranges, sorted, tile the data section exactly (no overlap, no gap, no trailing bytes).

    Raises:
        CheckpointError: naming `path` and the tensor.
    """
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes, too short for a safetensors header")
    head = f.read(8)
    if len(head) != 8:
        raise CheckpointError(f"{path}: truncated before the header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > file_size - 8:
        raise CheckpointError(f"{path}: header length {n} exceeds the file ({file_size} bytes): truncated?")
    blob = f.read(n)
    if len(blob) != n:
        raise CheckpointError(f"{path}: truncated inside the header")
    header = _loads(path, blob, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    base, data_size = 8 + n, file_size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(h, dict):
            raise CheckpointError(f"{where}: entry is a JSON {type(h).__name__}, not an object")
        dtype = ST_DTYPES.get(h.get("dtype")) if isinstance(h.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {_show(h.get('dtype'), 40)} "
                                  f"(known: {', '.join(ST_DTYPES)})")
        shape = h.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_show(shape)}")
        offsets = h.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] integers, got {_show(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not 0 ≤ begin ≤ end")
        if end > data_size:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] exceed the data section "
                                  f"({data_size} bytes): truncated?")
        elements = 1
        for d in shape:  # the running product stays a torch size, as torch.empty requires
            elements *= d
            if elements > MAX_DIM:
                raise CheckpointError(f"{where}: shape {_show(shape)} overflows a tensor size")
        nbytes = elements * dtype.itemsize
        if nbytes != end - begin:
            raise CheckpointError(f"{where}: shape {_show(shape)} of {h['dtype']} is {nbytes} bytes but "
                                  f"data_offsets [{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, name))
        out[name] = TensorInfo(path, dtype, tuple(shape), base + begin, base + end)
    covered, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] overlap "
                                  f"{prev[2]!r} [{prev[0]}, {prev[1]}]")
        if begin > covered:
            raise CheckpointError(f"{path}: tensor {name!r}: bytes [{covered}, {begin}) of the data section "
                                  "belong to no tensor")
        covered, prev = end, (begin, end, name)
    if covered != data_size:
        raise CheckpointError(f"{path}: {data_size - covered} bytes after the last tensor's data "
                              f"(data section {data_size} bytes, tensors cover {covered})")
    return out


def read_header(path: str) -> dict[str, TensorInfo]:
    """Name → TensorInfo from one safetensors file's header, validated (see `parse_header`)."""
    return _read_header(path)[0]


def _read_header(path: str) -> tuple[dict[str, TensorInfo], tuple[int, int, int]]:
    """The validated header and the identity (st_dev, st_ino, st_size) of the file it came from."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # a FIFO must not block
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path}: not a regular file")
            return parse_header(path, f, st.st_size), (st.st_dev, st.st_ino, st.st_size)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None


def _hf_blobs(root: Path) -> Path | None:
    """`models--*/blobs` when `root` lies in an HF hub cache snapshot (`models--*/snapshots/<rev>/…`)."""
    for anc in root.parents:
        if anc.name == "snapshots" and anc.parent.name.startswith("models--"):
            return anc.parent / "blobs"
    return None


def model_file(model_dir: str | Path, name: object, *, named_by: str | None = None) -> Path:
    """`model_dir/name`, checked to stay inside the model dir.

    `name` must be relative, without `..`; the path, symlinks resolved, must lie inside the
    dir or, for a snapshot of the HF hub cache (`models--ORG--NAME/snapshots/REV`), inside
    that repo's `blobs/` (where the hub's snapshot symlinks point). Missing files are the
    caller's business (`.is_file()` on the result).

    Raises:
        CheckpointError: naming the file (and `named_by`, the file that named it).
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{named_by or model_dir}: invalid file name {_show(name)}")
    path = Path(model_dir) / name
    what = f"{named_by}: names {name!r}, which is" if named_by else f"{path} is"
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{what} outside the model dir")
    root = Path(model_dir).resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise CheckpointError(f"{what} a symlink that cannot be resolved ({err})") from None
    blobs = _hf_blobs(root)
    if not (real.is_relative_to(root) or (blobs is not None and real.is_relative_to(blobs.resolve()))):
        raise CheckpointError(f"{what} a symlink leading outside the model dir (to {real})")
    return path


def read_json(path: Path, what: str, strict: bool = True) -> object:
    """A small JSON file (≤ 64 MiB, refused before reading when larger); `strict` as in `_loads`."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:  # refused before reading it
            raise CheckpointError(f"{path}: over the {MAX_JSON_BYTES}-byte limit for {what}")
        with open(path, "rb") as f:
            blob = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(blob) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: over the {MAX_JSON_BYTES}-byte limit for {what}")
    return _loads(str(path), blob, what, strict)


class Checkpoint:
    """The weights of one HF model dir, read one tensor at a time.

    Every weights file is named inside the dir (`model_file`) and its header validated
    (`parse_header`) here, before any tensor is read; an index must be a JSON object whose
    `weight_map` maps tensor names to files, each tensor in the file the index names; a
    tensor held by two files is refused. `read` reads only validated byte ranges, from the
    same file (device, inode, size) that was validated.

    Raises:
        FileNotFoundError: no weights in the dir.
        CheckpointError: a file named outside the dir, a malformed index or header.
        ValueError: only pickle (`.bin`) weights and `allow_pickle` is off.
    """

    def __init__(self, model_dir: str, allow_pickle: bool = False):
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._files: dict[str, tuple[int, int, int]] = {}  # validated file → (st_dev, st_ino, size)
        files, weight_map = self._weight_files(".safetensors")
        if files:
            for path in files:
                header, self._files[str(path)] = _read_header(str(path))
                for name, info in header.items():
                    if name in self.tensors:
                        raise CheckpointError(f"{model_dir}: tensor {name!r} is in both {self.tensors[name].file} "
                                              f"and {path}")
                    self.tensors[name] = info
            for name, fname in (weight_map or {}).items():
                info = self.tensors.get(name)
                if info is None or Path(info.file) != self.dir / fname:
                    raise CheckpointError(f"{self.dir / 'model.safetensors.index.json'}: maps tensor {name!r} "
                                          f"to {fname!r}, which does not hold it")
            return
        pickled, _ = self._weight_files(".bin")
        if not pickled:
            raise FileNotFoundError(f"{model_dir}: no model weights (*.safetensors or pytorch_model*.bin)")
        if not allow_pickle:
            raise ValueError(f"{model_dir} has only pickle (.bin) weights; convert them to safetensors, "
                             "or opt in with `allow_pickle: true`")
        self._pickled = {}
        for path in pickled:
            self._pickled.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        self.tensors = {n: TensorInfo(str(self.dir), t.dtype, tuple(t.shape), 0, 0)
                        for n, t in self._pickled.items()}

    def _weight_files(self, suffix: str) -> tuple[list[Path], dict[str, str] | None]:
        """The weights files (each checked to lie in the dir) and the index's weight_map, if any."""
        stem = "model" if suffix == ".safetensors" else "pytorch_model"
        index = model_file(self.dir, f"{stem}{suffix}.index.json")
        if index.is_file():
            data = read_json(index, "index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not an index (a JSON object whose `weight_map` maps tensor "
                                      "names to file names)")
            paths = [model_file(self.dir, n, named_by=str(index)) for n in sorted(set(weight_map.values()))]
            for path in paths:
                if not path.is_file():
                    raise CheckpointError(f"{index}: names {path.name!r}, which is not a file in {self.dir}")
            return paths, weight_map
        single = model_file(self.dir, f"{stem}{suffix}")
        return ([single] if single.is_file() else []), None

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor holding the weight `name` (no view into a file)."""
        if self._pickled is not None:
            return self._pickled[name].clone()
        info = self.tensors[name]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        fd = os.open(info.file, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != self._files[info.file]:
                raise CheckpointError(f"{info.file}: changed since its header was validated (reading {name!r})")
            while done < len(view):
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: truncated while reading {name!r}")
                done += got
        finally:
            os.close(fd)
        return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class Slot:
    file: str
    start: int
    nbytes: int


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


class ShardWriter:
    """Sharded safetensors output whose layout is fixed before any data is written.

    Args:
        out_dir: directory that receives the shards (created).
        layout: (name, shape, dtype) in write order.
        shard_bytes: a shard is closed before it would exceed this (one tensor may exceed it alone).
    """

    def __init__(self, out_dir: str, layout: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int):
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in layout:
            nbytes = _nbytes(item[1], item[2])
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.slots: dict[str, Slot] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        for fname, group in zip(names, groups, strict=True):
            self._prepare(str(self.out_dir / fname), group)
            self.weight_map.update({name: fname for name, _, _ in group})
        self.sharded = n > 1

    def _prepare(self, path: str, group: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in group:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        base = 8 + len(blob)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(base + offset)
        for name, shape, dtype in group:
            start = header[name]["data_offsets"][0]
            self.slots[name] = Slot(path, base + start, _nbytes(shape, dtype))
        self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes to its planned offset (shape and dtype as planned)."""
        slot = self.slots[name]
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != slot.nbytes:
            raise ValueError(f"{name}: {data.numel()} bytes, planned {slot.nbytes}")
        write_at(slot, data)

    def finish(self) -> None:
        """Write the index (sharded outputs only)."""
        if self.sharded:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_at(slot: Slot, data: torch.Tensor) -> None:
    """pwrite a uint8 tensor at a slot (safe from several processes: slots are disjoint)."""
    view, done = memoryview(data.numpy()), 0
    fd = os.open(slot.file, os.O_WRONLY)
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], slot.start + done)
    finally:
        os.close(fd)
