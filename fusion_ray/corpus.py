"""Reading chat corpora row by row, never whole: JSONL, Parquet, on-disk or hub HF datasets.

Used by `prepare` (training corpora) and `eval` (held-out corpora). `iter_rows` yields
(file, row index, row) per row; a JSONL line that cannot be used comes as a `BadLine` with
the reason: not UTF-8, not JSON, nested deeper than `MAX_JSON_DEPTH` or longer than
`MAX_LINE_BYTES` (read in bounded pieces, never whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fusion_ray import locations
from fusion_ray.config import CorpusSpec

RAW_CHARS = 2000  # how much of a rejected row is kept
MAX_LINE_BYTES = 8 << 20  # a longer JSONL line is rejected without being read whole
MAX_JSON_DEPTH = 64  # a chat row nests 3-4 levels
_SKIP_CHUNK = 1 << 20  # the rest of an over-long line is skipped in pieces of this size


@dataclass
class BadLine:
    """A line that is not a JSON value we can use: the reason and the start of its text."""

    reason: str
    line: str


def iter_rows(spec: CorpusSpec) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, row index, row) for one corpus; unusable lines come as `BadLine`."""
    path = locations.corpus_path(spec.path)
    local = Path(path)
    count = 0
    for item in _iter_source(path, local, spec):
        yield item
        count += 1
        if spec.max_rows and count >= spec.max_rows:
            return


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when lists/dicts nest deeper than `limit` (iterative; stops at the first such path)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _head(line: bytes) -> str:
    return line[:RAW_CHARS].decode("utf-8", "backslashreplace")


def parse_line(line: bytes, first: bool = False) -> Any:
    """One JSONL line → its JSON value, or a `BadLine` saying why not (never raises)."""
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        return BadLine(f"invalid UTF-8 at byte {err.start} of the line", _head(line))
    deep = BadLine(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", text[:RAW_CHARS])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return BadLine(f"invalid JSON: {err.msg} at column {err.colno}", text[:RAW_CHARS])
    except RecursionError:  # json's decoder stops at the interpreter's recursion limit (~1000)
        return deep
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        return BadLine(f"invalid JSON: {str(err)[:200]}", text[:RAW_CHARS])
    # the bound is far below json's own: rows are walked (hashed, rendered) by code that recurses
    if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and isinstance(value, dict | list) \
            and too_deep(value):
        return deep
    return value


def iter_jsonl(path: str, local: Path) -> Iterator[tuple[str, int, Any]]:
    """(file, line index, value or `BadLine`) per non-blank line, read as bytes, at most
    `MAX_LINE_BYTES` at a time: a longer line is skipped to its end (its start is kept) and rejected."""
    with open(local, "rb") as fh:
        i = -1
        while line := fh.readline(MAX_LINE_BYTES + 1):
            i += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                size = len(line)
                while more := fh.readline(_SKIP_CHUNK):
                    size += len(more)
                    if more.endswith(b"\n"):
                        break
                yield path, i, BadLine(f"line longer than {MAX_LINE_BYTES // 2**20} MiB ({size:,} bytes)",
                                       _head(line))
            elif line.strip():
                yield path, i, parse_line(line, first=i == 0)


def _iter_source(path: str, local: Path, spec: CorpusSpec) -> Iterator[tuple[str, int, Any]]:
    if local.is_file() and local.suffix in (".jsonl", ".json"):
        yield from iter_jsonl(path, local)
    elif local.is_file() and local.suffix == ".parquet" or local.is_dir() and any(local.glob("*.parquet")):
        files = [local] if local.is_file() else sorted(local.glob("*.parquet"))
        for f in files:
            i = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield str(f), i, row
                    i += 1
    else:
        import datasets

        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            ds = ds[spec.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(path, split=spec.split, streaming=True)
        for i, row in enumerate(ds):
            yield path, i, row
