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

Packing (`train.packing`, `capacity` below): inside each window the seeded permutation is
regrouped (`fill_order`) so that rows that fill a packed row together stand side by side
(best-fit decreasing: the longest row first, each into the fullest packed row it still fits;
the packed rows then in the order of their first row in the permutation, and rows inside in that
order). The stream is then cut into packed rows, greedily in stream order (next fit: a row joins
the current packed row while their tokens fit in `capacity`, else it starts the next one), and
the packed rows take the place of rows above: a global
micro-batch is `micro × world` packed rows, rank r takes packed rows [r·micro, (r+1)·micro) of
each, the last partial one is dropped. The packing depends only on the rows' token counts (read
once from the files, `RowPlan.of(..., lengths=True)`), the seed and the epoch, so every rank
computes the same packed rows and the same number of micro-steps, and a resumed run skips exactly
the micro-batches it consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fusion_ray import io

PACKING_ORDER = "fill-order"  # names the packing below in a packed run's fingerprint (trainer/fit.py)
PACKED_COLUMN = "_packed_row"  # rank_batches with packing: the packed row of the micro-batch a row belongs to


@dataclass(frozen=True)
class RowPlan:
    """The files of one training dataset and their row counts (read from parquet footers)."""

    files: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    shuffle: bool
    window_rows: int
    # tokens of each row (`input_ids`), the files' rows one after the other: only what packing needs
    lengths: np.ndarray | None = field(default=None, compare=False)
    # (epoch, capacity) → packed_rows: total_steps and rank_batches both need each epoch's packing
    _packed: dict = field(default_factory=dict, compare=False, repr=False)
    # (epoch, capacity) → each window's packing order: packed_rows and rank_batches both read it
    _filled: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, data_dir: str, seed: int, shuffle: bool, window_rows: int, lengths: bool = False) -> RowPlan:
        files = tuple(sorted(io.list_files(data_dir), key=io.basename))
        counts = tuple(io.parquet_metadata(f).num_rows for f in files)
        return cls(files, counts, seed, shuffle, window_rows, token_counts(files) if lengths else None)

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def to_wire(self) -> dict:
        wire = {"files": list(self.files), "counts": list(self.counts), "seed": self.seed,
                "shuffle": self.shuffle, "window_rows": self.window_rows}
        if self.lengths is not None:  # packing only: one int per row
            wire["lengths"] = self.lengths.tolist()
        return wire

    @classmethod
    def from_wire(cls, d: dict) -> RowPlan:
        lengths = np.asarray(d["lengths"], dtype=np.int64) if d.get("lengths") is not None else None
        return cls(tuple(d["files"]), tuple(d["counts"]), d["seed"], d["shuffle"], d["window_rows"], lengths)

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

    def window_order(self, epoch: int, w: int, n: int, capacity: int | None = None) -> np.ndarray:
        """The stream order of window w's n rows (indices into its files' rows, one file after the other).
        With `capacity` (packing): that order regrouped by `fill_order` over the rows' token counts."""
        if capacity is not None:
            return self._filled_orders(epoch, capacity)[w]
        return np.random.default_rng([self.seed, epoch, w]).permutation(n) if self.shuffle else np.arange(n)

    def _window_lengths(self, epoch: int) -> list[np.ndarray]:
        """The token counts of each window's rows (its files' rows, one file after the other)."""
        if self.lengths is None:
            raise ValueError("packing needs the rows' token counts: RowPlan.of(..., lengths=True)")
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return [np.concatenate([self.lengths[starts[i]:starts[i + 1]] for i in files])
                for files in self.windows(epoch)]

    def _filled_orders(self, epoch: int, capacity: int) -> list[np.ndarray]:
        """Each window's stream order under packing, computed once per (epoch, capacity)."""
        if (epoch, capacity) not in self._filled:
            orders = []
            for w, lengths in enumerate(self._window_lengths(epoch)):
                order = self.window_order(epoch, w, len(lengths))
                orders.append(order[fill_order(lengths[order], capacity)])
            self._filled[epoch, capacity] = orders
        return self._filled[epoch, capacity]

    def packed_rows(self, epoch: int, capacity: int) -> np.ndarray:
        """The packed row (0, 1, ...) of each position of `epoch`'s stream (`pack` over its token counts)."""
        if (epoch, capacity) not in self._packed:
            lengths = self._window_lengths(epoch)
            stream = [window[order] for window, order in zip(lengths, self._filled_orders(epoch, capacity),
                                                              strict=True)]
            self._packed[epoch, capacity] = pack(np.concatenate(stream) if stream else np.zeros(0, np.int64),
                                                 capacity)
        return self._packed[epoch, capacity]

    def packed_count(self, epoch: int, capacity: int) -> int:
        """Packed rows in `epoch`'s stream."""
        rows = self.packed_rows(epoch, capacity)
        return int(rows[-1]) + 1 if len(rows) else 0


def token_counts(files: tuple[str, ...]) -> np.ndarray:
    """Tokens of each row of `files` (the length of `input_ids`), in order: the one column read."""
    import pyarrow.compute as pc

    parts = [pc.list_value_length(io.read_table(f, columns=["input_ids"]).column("input_ids")).to_numpy()
             for f in files]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Next-fit packing, in order: the packed row of each row, a row of n tokens counting min(n, capacity)
    (longer rows are cut to `capacity` by the collate, and fill a packed row alone).

    Greedy in the given order and nothing else, so it is the same on every rank and every run; a
    packed row is never reopened, so rows keep their stream order inside and across packed rows.
    """
    out = np.empty(len(lengths), dtype=np.int64)
    row, used = -1, capacity
    for i, n in enumerate(np.minimum(np.asarray(lengths, dtype=np.int64), capacity).tolist()):
        if used + n > capacity:
            row, used = row + 1, 0
        out[i] = row
        used += n
    return out


def fill_order(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """A permutation of rows (given in stream order) that puts the rows of each packed row side by
    side, so that `pack` (next fit) over it fills its packed rows as best-fit decreasing does.

    Best-fit decreasing: rows by decreasing tokens (cut to `capacity`; ties: stream order), each
    into the open packed row with the least room that still holds it, else a new one. Then the
    packed rows in the order of their first row in the stream, and each one's rows in stream
    order. Deterministic, so every rank computes the same order. Next fit over the result makes
    the same packed rows, or fewer where two neighbours fit together.
    """
    import bisect

    sizes = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, packed row) of every packed row, sorted
    for i in sorted(range(len(sizes)), key=lambda k: (-int(sizes[k]), k)):
        n = int(sizes[i])
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, b = room.pop(at)
            bins[b].append(i)
            if left > n:
                bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            if capacity > n:
                bisect.insort(room, (capacity - n, len(bins) - 1))
    bins = [sorted(b) for b in bins]
    bins.sort(key=lambda b: b[0])
    return np.asarray([i for b in bins for i in b], dtype=np.int64)


def rank_batches(plan: RowPlan, epoch: int, micro: int, rank: int, world: int,
                 capacity: int | None = None) -> Iterator:
    """This rank's micro-batches (pyarrow tables of `micro` rows) of one epoch's stream.

    With `capacity` (packing): micro-batches of `micro` packed rows of up to `capacity` tokens;
    each table holds the rows of its packed rows in stream order, and a column `PACKED_COLUMN`
    (0 … micro-1) naming the packed row each belongs to.
    """
    import pyarrow as pa

    span = micro * world
    if capacity is None:
        unit = None  # a row is the unit a micro-batch counts
        limit = plan.rows // span * span  # stream positions past it: the last, partial global micro-batch
        sizes_of = np.full(limit // span, micro)  # rows of each of this rank's micro-batches
    else:
        unit = plan.packed_rows(epoch, capacity)  # the packed row of each stream position
        limit = (int(unit[-1]) + 1 if len(unit) else 0) // span * span  # packed rows past it: dropped
        owned = ((unit % span) // micro == rank) & (unit < limit)
        sizes_of = np.bincount(unit[owned] // span, minlength=limit // span)
    start, pending, have, k = 0, [], 0, 0
    for w, files in enumerate(plan.windows(epoch)):
        sizes = [plan.counts[i] for i in files]
        n = sum(sizes)
        perm = plan.window_order(epoch, w, n, capacity)
        position = start + np.arange(n)
        slot = position if unit is None else unit[position]
        mine = ((slot % span) // micro == rank) & (slot < limit)
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
        if unit is not None:
            table = table.append_column(PACKED_COLUMN, pa.array(slot[mine] % span - rank * micro, pa.int32()))
        pending.append(table)
        have += table.num_rows
        while k < len(sizes_of) and have >= sizes_of[k]:
            merged, size = pa.concat_tables(pending), int(sizes_of[k])
            yield merged.slice(0, size)
            rest = merged.slice(size)
            pending, have, k = [rest], rest.num_rows, k + 1
