"""The `prepare` stage: stream chat corpora, render each conversation once, shard to Parquet.

Reads JSONL, Parquet (a file or a directory of files), an on-disk HF dataset
(`save_to_disk`) or a hub dataset id (streamed), row by row: the corpus is never
loaded whole. Each usable row becomes one `prepared/part-*.parquet` row (schema
`PREPARED`); each unusable one becomes a `prepared/_rejected/part-*.parquet` row
with its reason. Duplicate sample ids are rejected. Counts (in, out, rejected,
truncated) go in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fusion_ray import io, locations, schema
from fusion_ray.collect.prompts import RowRejected, prepare_row
from fusion_ray.config import CorpusSpec, FusionConfig

RAW_CHARS = 2000  # how much of a rejected row is kept
REJECTED_DIR = "_rejected"  # prepared/_rejected/: underscore, so readers of prepared/ skip it


@dataclass
class BadLine:
    """A line that is not a JSON object at all."""

    reason: str
    line: str


def iter_rows(spec: CorpusSpec) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, row index, row) for one corpus; unparseable lines come as `BadLine`."""
    path = locations.corpus_path(spec.path)
    local = Path(path)
    count = 0
    for item in _iter_source(path, local, spec):
        yield item
        count += 1
        if spec.max_rows and count >= spec.max_rows:
            return


def _iter_source(path: str, local: Path, spec: CorpusSpec) -> Iterator[tuple[str, int, Any]]:
    if local.is_file() and local.suffix in (".jsonl", ".json"):
        with open(local, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield path, i, json.loads(line)
                except json.JSONDecodeError as err:
                    yield path, i, BadLine(f"invalid JSON: {err.msg} at column {err.colno}", line)
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


class ShardWriter:
    """Buffer rows and write numbered Parquet shards of `shard_rows` rows atomically."""

    def __init__(self, out: io.StageOutput, prefix: str, table_schema: pa.Schema, shard_rows: int):
        self.out, self.prefix, self.schema, self.shard_rows = out, prefix, table_schema, shard_rows
        self.rows: list[dict] = []
        self.shards = 0
        self.total = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.out.write_table(f"{self.prefix}part-{self.shards:05d}.parquet", table)
        self.shards += 1
        self.total += len(self.rows)
        self.rows = []


def load_tokenizer(model) -> Any:
    """The model's tokenizer.

    Raises:
        ValueError: naming the model and the path when the tokenizer does not load.
    """
    from transformers import AutoTokenizer

    ref = model.tokenizer or model.path
    try:
        path = locations.local_dir(ref, revision=model.revision)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except locations.LocationError as err:
        raise ValueError(f"model {model.name!r}: {err}") from err
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"model {model.name!r}: cannot load its tokenizer from {path}: {err}") from err


def fingerprint(cfg: FusionConfig) -> str:
    inputs = [locations.fingerprint(c.path) for c in cfg.data.train]
    pivot = cfg.pivot.tokenizer or cfg.pivot.path
    return io.fingerprint("prepare", cfg.to_dict()["data"], locations.fingerprint(pivot, revision=cfg.pivot.revision),
                          cfg.collect.shard_rows, inputs)


def run(cfg: FusionConfig, force: bool = False, log=print) -> dict:
    """Prepare the training corpora; skipped when the manifest matches."""
    out_dir, fp = cfg.stage_dir("prepare"), fingerprint(cfg)
    if not force and io.is_done(out_dir, fp):
        return {"status": "skipped", "dir": out_dir}
    tokenizer = load_tokenizer(cfg.pivot)
    out = io.StageOutput(out_dir, fp)
    good = ShardWriter(out, "", schema.PREPARED, cfg.collect.shard_rows)
    bad = ShardWriter(out, f"{REJECTED_DIR}/", schema.REJECTED, cfg.collect.shard_rows)
    seen: set[str] = set()
    truncated = 0
    for spec in cfg.data.train:
        for file, index, row in iter_rows(spec):
            try:
                if isinstance(row, BadLine):
                    raise RowRejected(row.reason)
                prep = prepare_row(row, tokenizer, max_length=cfg.data.max_length, fmt=spec.format)
                if prep.sample_id in seen:
                    raise RowRejected(f"duplicate sample_id {prep.sample_id!r}")
            except RowRejected as why:
                sid = row.get("id") if isinstance(row, dict) else None
                raw = row.line if isinstance(row, BadLine) else json.dumps(row, default=str)
                bad.add({"source_file": file, "source_row": index, "sample_id": str(sid or ""),
                         "reason": str(why), "raw": raw[:RAW_CHARS]})
                continue
            seen.add(prep.sample_id)
            truncated += prep.truncated
            good.add({"sample_id": prep.sample_id, "domain": spec.domain, "text": prep.text,
                      "span_starts": prep.span_starts, "span_ends": prep.span_ends,
                      "truncated": prep.truncated, "source_file": file, "source_row": index})
    good.flush()
    bad.flush()
    rows = {"in": good.total + bad.total, "out": good.total, "rejected": bad.total,
            "truncated": truncated}
    out.commit(io.Manifest(stage="prepare", fingerprint=fp, config_hash=cfg.config_hash(), rows=rows,
                           extra={"shards": good.shards}), config=cfg.to_dict())
    log(f"[prepare] {rows['out']} rows in {good.shards} shard(s); rejected {rows['rejected']}, "
        f"truncated {truncated}")
    return {"status": "done", "dir": out_dir, "rows": rows}
