"""Tensor-at-a-time checkpoint I/O: lazy (sharded) safetensors reads, pre-planned sharded writes.

`Checkpoint` indexes a model dir's safetensors headers (single file or sharded with an
index) and reads ONE tensor on demand with `pread` into a fresh buffer: no mmap, so a
merge holds only the tensors it is working on. `.bin` checkpoints are refused unless
the caller opts in (`allow_pickle`), and are then loaded with `weights_only`.

`ShardWriter` plans the output layout (names, shapes, dtypes → shard files and byte
offsets) before any tensor is merged, writes every shard's header up front, then
`pwrite`s each merged tensor straight to its offset: no output shard is held in memory,
and several processes may fill disjoint tensors of the same files.
Local paths only. This module imports torch and nothing heavier.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Name → TensorInfo from one safetensors file's header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    base = 8 + size
    return {name: TensorInfo(path, ST_DTYPES[h["dtype"]], tuple(h["shape"]),
                             base + h["data_offsets"][0], base + h["data_offsets"][1])
            for name, h in header.items()}


class Checkpoint:
    """The weights of one HF model dir, read one tensor at a time.

    Raises:
        FileNotFoundError: no weights in the dir.
        ValueError: only pickle (`.bin`) weights and `allow_pickle` is off.
    """

    def __init__(self, model_dir: str, allow_pickle: bool = False):
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = self._weight_files(".safetensors")
        if files:
            for path in files:
                self.tensors.update(read_header(str(path)))
            return
        pickled = self._weight_files(".bin")
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

    def _weight_files(self, suffix: str) -> list[Path]:
        stem = "model" if suffix == ".safetensors" else "pytorch_model"
        index = self.dir / f"{stem}{suffix}.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.dir / n for n in names]
        single = self.dir / f"{stem}{suffix}"
        return [single] if single.is_file() else []

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor holding the weight `name` (no view into a file)."""
        if self._pickled is not None:
            return self._pickled[name].clone()
        info = self.tensors[name]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        fd = os.open(info.file, os.O_RDONLY)
        try:
            while done < len(view):
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise OSError(f"{info.file}: truncated while reading {name}")
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
