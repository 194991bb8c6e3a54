"""The order a target trains on its rows, and each rank's micro-batches of it.

Every run of one config trains on the same rows in the same order, wherever its workdir is and
however many times it restarts: the order depends only on the files' names (sorted), their row
counts, the seed and the epoch. No Ray Data pipeline decides it (its block layout differs
between a local disk and an object store, and its splits hand blocks out by timing), and no
task runs beside the workers: each worker reads the parquet files itself.

The stream of an epoch: the files in a seeded order, taken in windows of about
`window_rows` rows; inside each window the rows in a seeded permutation. The stream is cut into
global micro-batches of `micro × world` rows; rank r takes rows [r·micro, (r+1)·micro) of each;
a last global micro-batch that is not full is dropped (every rank takes the same number of
micro-steps, which DDP and ZeRO need). A rank keeps only its own rows of a window: its memory is
one file plus window_rows / world rows, whatever the dataset's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fusion_ray import io


@dataclass(frozen=True)
class RowPlan:
    """The files of one training dataset and their row counts (read from parquet footers)."""

    files: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    shuffle: bool
    window_rows: int

    @classmethod
    def of(cls, data_dir: str, seed: int, shuffle: bool, window_rows: int) -> RowPlan:
        files = tuple(sorted(io.list_files(data_dir), key=io.basename))
        counts = tuple(io.parquet_metadata(f).num_rows for f in files)
        return cls(files, counts, seed, shuffle, window_rows)

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def to_wire(self) -> dict:
        return {"files": list(self.files), "counts": list(self.counts), "seed": self.seed,
                "shuffle": self.shuffle, "window_rows": self.window_rows}

    @classmethod
    def from_wire(cls, d: dict) -> RowPlan:
        return cls(tuple(d["files"]), tuple(d["counts"]), d["seed"], d["shuffle"], d["window_rows"])

    def windows(self, epoch: int) -> list[list[int]]:
        """File indices of each window of `epoch`, in stream order."""
        order = list(range(len(self.files)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        out, current, size = [], [], 0
        for i in order:
            current.append(i)
            size += self.counts[i]
            if size >= self.window_rows:
                out.append(current)
                current, size = [], 0
        return out + ([current] if current else [])


def rank_batches(plan: RowPlan, epoch: int, micro: int, rank: int, world: int) -> Iterator:
    """This rank's micro-batches (pyarrow tables of `micro` rows) of one epoch's stream."""
    import pyarrow as pa

    span = micro * world
    limit = plan.rows // span * span  # stream positions past it: the last, partial global micro-batch
    start, pending, have = 0, [], 0
    for w, files in enumerate(plan.windows(epoch)):
        sizes = [plan.counts[i] for i in files]
        n = sum(sizes)
        perm = (np.random.default_rng([plan.seed, epoch, w]).permutation(n) if plan.shuffle
                else np.arange(n))
        position = start + np.arange(n)
        mine = ((position % span) // micro == rank) & (position < limit)
        wanted = perm[mine]  # window row indices, in this rank's stream order
        start += n
        if not len(wanted):
            continue
        ascending = np.sort(wanted)
        parts, offset = [], 0
        for i, size in zip(files, sizes, strict=True):
            lo, hi = np.searchsorted(ascending, [offset, offset + size])
            if hi > lo:
                parts.append(io.read_table(plan.files[i]).take(pa.array(ascending[lo:hi] - offset)))
            offset += size
        table = pa.concat_tables(parts).take(pa.array(np.searchsorted(ascending, wanted)))
        pending.append(table)
        have += table.num_rows
        while have >= micro:
            merged = pa.concat_tables(pending)
            yield merged.slice(0, micro)
            rest = merged.slice(micro)
            pending, have = [rest], rest.num_rows
