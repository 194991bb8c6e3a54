"""Gathering a Ray Data stream's rows back into their input shards, each written once complete.

The engine stages (collect, sample, reward) stream input shards through actor pools whose
batches arrive in any order and, after an actor is killed and its task retried, possibly twice.
The driver keeps the first copy of each row per shard and writes the shard atomically, in the
input's order, as soon as every expected row is in: every input row lands exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path

import pyarrow as pa

from fusion_ray import io


def gather(batch: pa.Table, pending: dict[str, dict | None], expected: dict[str, list[Hashable]],
           out: io.StageOutput, keys: Callable[[pa.Table], list[Hashable]]) -> None:
    """Add a batch's rows (with a `path` column naming their input shard) to their shards.

    Args:
        pending: shard name → rows so far by key (None once written).
        expected: shard name → the keys of its rows, in output order.
        keys: the key of each row of a table (e.g. its `sample_id`).
    """
    names = [Path(p).name for p in batch.column("path").to_pylist()]
    table = batch.drop_columns(["path"])
    row_keys = keys(table)
    for i, name in enumerate(names):
        rows = pending[name]
        if rows is None:
            continue  # shard already written; a retried task sent this row again
        rows.setdefault(row_keys[i], table.slice(i, 1))
        if len(rows) == len(expected[name]):
            out.write_table(name, pa.concat_tables([rows[k] for k in expected[name]]).combine_chunks())
            pending[name] = None


def columns_key(*columns: str) -> Callable[[pa.Table], list[Hashable]]:
    """Row keys made of these columns' values (one column: the value itself)."""
    def keys(table: pa.Table) -> list[Hashable]:
        values = [table.column(c).to_pylist() for c in columns]
        return values[0] if len(values) == 1 else list(zip(*values, strict=True))
    return keys
