"""One shard map for the engine stages: input shards → an actor pool → each output shard written
once complete.

The engine stages (collect, sample, reward, and dpo's reference pass) stream input shards through
Ray Data actor pools whose batches arrive in any order and, after an actor is killed and its
task retried, possibly twice. The driver keeps the first copy of each row per shard and writes
the shard atomically, in the input's order, as soon as every expected row is in: every input row
lands exactly once, and a rerun redoes only the shards it has not written (`io.StageOutput.has`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion_ray import io


def gather(batch: pa.Table, pending: dict[str, dict | None], expected: dict[str, list[Hashable]],
           out: io.StageOutput, keys: Callable[[pa.Table], list[Hashable]], *, dropped: str | None = None,
           empty: pa.Schema | None = None) -> int:
    """Add a batch's rows (with a `path` column naming their input shard) to their shards.

    Args:
        pending: shard name → rows so far by key (None once written).
        expected: shard name → the keys of its rows, in output order.
        keys: the key of each row of a table (e.g. its `sample_id`).
        dropped: a bool column: a row with True counts as done but is not written.
        empty: the schema of a shard whose every row was dropped.

    Returns:
        rows dropped from the shards this batch completed.
    """
    names = [Path(p).name for p in batch.column("path").to_pylist()]
    gone = batch.column(dropped).to_pylist() if dropped else None
    table = batch.drop_columns(["path", *([dropped] if dropped else [])])
    row_keys = keys(table)
    n_dropped = 0
    for i, name in enumerate(names):
        rows = pending[name]
        if rows is None or row_keys[i] in rows:
            continue  # a retried task sent this row again: the first copy stays
        rows[row_keys[i]] = None if gone is not None and gone[i] else table.slice(i, 1)
        if len(rows) == len(expected[name]):
            kept = [rows[k] for k in expected[name] if rows[k] is not None]
            out.write_table(name, pa.concat_tables(kept).combine_chunks() if kept else empty.empty_table())
            n_dropped += len(expected[name]) - len(kept)
            pending[name] = None
    return n_dropped


def columns_key(*columns: str) -> Callable[[pa.Table], list[Hashable]]:
    """Row keys made of these columns' values (one column: the value itself)."""
    def keys(table: pa.Table) -> list[Hashable]:
        values = [table.column(c).to_pylist() for c in columns]
        return values[0] if len(values) == 1 else list(zip(*values, strict=True))
    return keys


def map_shards(files: list[str], expected: dict[str, list[Hashable]], out: io.StageOutput, udf: type, *,
               udf_kwargs: dict[str, Any], keys: Callable[[pa.Table], list[Hashable]], batch_size: int,
               concurrency: int, resources: dict[str, Any], name: str, what: str,
               columns: list[str] | None = None, dropped: str | None = None, empty: pa.Schema | None = None) -> int:
    """Stream the parquet `files` through a pool of `concurrency` actors of `udf` and write each output
    shard of `expected` (shard name → its rows' keys, in order) into `out` once all its rows are in.

    A shard named in `expected` with no key is written empty at once (`empty`). Several input files
    may feed one output shard (the same file name below different dirs). `resources`: Ray Data's
    actor arguments (`placement.ray_data_args`); placement groups it made are removed afterwards.

    Returns:
        the rows the UDF dropped (`dropped` column True).

    Raises:
        RuntimeError: `what` and the shards still incomplete after the stream ended.
    """
    import ray

    pending: dict[str, dict | None] = {}
    for shard, shard_keys in expected.items():
        if shard_keys:
            pending[shard] = {}
        elif empty is None:
            raise ValueError(f"{what}: input shard {shard} has no rows")
        else:
            out.write_table(shard, empty.empty_table())
    n_dropped = 0
    try:
        if pending:
            ds = ray.data.read_parquet([f for f in files if Path(f).name in pending], include_paths=True)
            if columns is not None:
                ds = ds.select_columns([*columns, "path"])
            ds = ds.map_batches(udf, fn_constructor_kwargs=udf_kwargs, batch_size=batch_size,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
                                **resources)
            ds.set_name(name)  # Ray Data's log lines name the part (parts run side by side)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                n_dropped += gather(batch, pending, expected, out, keys, dropped=dropped, empty=empty)
    finally:
        if "ray_remote_args_fn" in resources:  # the engines' placement groups outlive their actors
            resources["ray_remote_args_fn"].remove()
    missing = {s: len(expected[s]) - len(rows) for s, rows in pending.items() if rows is not None}
    if missing:
        raise RuntimeError(f"{what}: shards incomplete after the run: {missing}")
    return n_dropped
