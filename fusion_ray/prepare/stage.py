"""The `prepare` stage: stream chat corpora, render each conversation once, shard to Parquet.

Reads JSONL, Parquet (a file or a directory of files), an on-disk HF dataset
(`save_to_disk`) or a hub dataset id (streamed), row by row (`corpus.py`): the
corpus is never loaded whole. Each usable row becomes one `prepared/part-*.parquet` row (schema
`PREPARED`); each unusable one becomes a `prepared/_rejected/part-*.parquet` row
with its file, row (for JSONL: the 0-based line index) and reason: among them
duplicate sample ids, and JSONL lines that are not UTF-8, not JSON, nested deeper
than `MAX_JSON_DEPTH` or longer than `MAX_LINE_BYTES` (read in bounded pieces,
never whole). Counts (in, out, rejected, truncated) go in the manifest. A training
corpus that gives no usable row fails the stage (`EmptyCorpus`), naming it, and
nothing is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion_ray import io, locations, schema
from fusion_ray import tokenizer as tokenizers
from fusion_ray.chat_template import Prepared, RowRejected, prepare_row
from fusion_ray.config import FusionConfig
from fusion_ray.contract import StageResult
from fusion_ray.corpus import RAW_CHARS, BadLine, iter_rows

REJECTED_DIR = "_rejected"  # prepared/_rejected/: underscore, so readers of prepared/ skip it
MAX_REASON_CHARS = 500
MAX_ID_CHARS = 1024
EXAMPLE_REASONS = 3  # rejected rows quoted when a corpus has no usable row


class EmptyCorpus(ValueError):
    """Training corpora that gave no usable row; the message names each (path, counts, reasons)."""


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


def fingerprint(cfg: FusionConfig) -> str:
    inputs = [locations.fingerprint(c.path) for c in cfg.data.train]
    pivot = cfg.pivot.tokenizer or cfg.pivot.path
    return io.fingerprint("prepare", cfg.to_dict()["data"], locations.fingerprint(pivot, revision=cfg.pivot.revision),
                          cfg.data.shard_rows, inputs)


def _clean(text: str, limit: int) -> str:
    """`text` cut to `limit` chars, writable as UTF-8 (lone surrogates escaped)."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _raw(row: Any) -> str:
    if isinstance(row, BadLine):
        return row.line
    try:
        return json.dumps(row, default=str)[:RAW_CHARS]
    except (ValueError, TypeError, RecursionError):
        return f"<{type(row).__name__}>"


def check_writable(prep: Prepared) -> None:
    """Refuse what Parquet shards (UTF-8) and later stages cannot hold.

    Raises:
        RowRejected: an id too long or not valid Unicode; text with a lone surrogate.
    """
    if len(prep.sample_id) > MAX_ID_CHARS:
        raise RowRejected(f"sample id longer than {MAX_ID_CHARS} characters")
    for what, text in (("sample id", prep.sample_id), ("text", prep.text)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RowRejected(f"{what} is not valid Unicode (a lone surrogate at character {err.start})") from None


@dataclass
class CorpusCount:
    """One training corpus's rows: kept, rejected, and the first reasons."""

    index: int
    path: str
    out: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < EXAMPLE_REASONS:
            self.reasons.append(f"{where}: {reason[:200]}")

    def problem(self) -> str:
        head = f"data.train.{self.index} ({self.path})"
        if not self.rejected:
            return f"{head}: no rows"
        return f"{head}: all {self.rejected} row(s) rejected, e.g. " + "; ".join(self.reasons)


def run(cfg: FusionConfig, force: bool = False, log=print) -> StageResult:
    """Prepare the training corpora; skipped when the manifest matches.

    Raises:
        EmptyCorpus: naming each training corpus that gave no usable row; nothing is committed
            (the rejected rows stay in the partial output for a look).
    """
    out_dir, fp = cfg.stage_dir("prepare"), fingerprint(cfg)
    out = io.begin(out_dir, fp, force)
    if out is None:
        return StageResult.skipped(out_dir)
    tokenizer = tokenizers.for_model(cfg.pivot)
    good = ShardWriter(out, "", schema.PREPARED, cfg.data.shard_rows)
    bad = ShardWriter(out, f"{REJECTED_DIR}/", schema.REJECTED, cfg.data.shard_rows)
    seen: set[str] = set()
    truncated = 0
    counts = [CorpusCount(n, spec.path) for n, spec in enumerate(cfg.data.train)]
    for spec, count in zip(cfg.data.train, counts, strict=True):
        for file, index, row in iter_rows(spec):
            try:
                if isinstance(row, BadLine):
                    raise RowRejected(row.reason)
                prep = prepare_row(row, tokenizer, max_length=cfg.data.max_length, fmt=spec.format)
                check_writable(prep)
                if prep.sample_id in seen:
                    raise RowRejected(f"duplicate sample_id {prep.sample_id!r}")
            except RowRejected as why:
                sid = row.get("id") if isinstance(row, dict) else None
                reason = _clean(str(why), MAX_REASON_CHARS)
                bad.add({"source_file": file, "source_row": index,
                         "sample_id": _clean(str(sid) if isinstance(sid, str | int) else "", MAX_ID_CHARS),
                         "reason": reason, "raw": _clean(_raw(row), RAW_CHARS)})
                count.reject(f"{Path(file).name} row {index}", reason)
                continue
            seen.add(prep.sample_id)
            count.out += 1
            truncated += prep.truncated
            good.add({"sample_id": prep.sample_id, "domain": spec.domain, "text": prep.text,
                      "span_starts": prep.span_starts, "span_ends": prep.span_ends,
                      "truncated": prep.truncated, "source_file": file, "source_row": index})
    good.flush()
    bad.flush()
    if empty := [c for c in counts if not c.out]:
        where = f"; rejected rows: {out.path(REJECTED_DIR)}" if bad.total else ""
        raise EmptyCorpus("prepare: no usable rows in " + " | ".join(c.problem() for c in empty) + where)
    rows = {"in": good.total + bad.total, "out": good.total, "rejected": bad.total,
            "truncated": truncated}
    out.commit(io.Manifest(stage="prepare", fingerprint=fp, config_hash=cfg.config_hash(), rows=rows,
                           extra={"shards": good.shards}), config=cfg.to_dict())
    log(f"[prepare] {rows['out']} rows in {good.shards} shard(s); rejected {rows['rejected']}, "
        f"truncated {truncated}")
    return StageResult("done", [out_dir], {"rows": rows})
