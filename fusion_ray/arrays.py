"""Ragged per-row numpy arrays ⇄ Arrow list columns, without going through Python lists.

Stage rows hold variable-length sequences ([T] ids, [T-1, k] top-k). `ragged` builds
`list<…>` / `list<list<…>>` columns from per-row arrays; `rows_of` reads a table back
as per-row dicts of numpy views (the top-k column as [n, k] when k is fixed).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def ragged(arrays: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    """Per-row arrays ([n] or [n, k]) → list<…> or list<list<…>>."""
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    if flat.ndim == 2:  # [positions, k] → list<list<…>>
        k = flat.shape[1]
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, k, dtype=np.int32)),
                                         pa.array(flat.reshape(-1), typ))
        return pa.ListArray.from_arrays(pa.array(offsets), inner)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))


def _split(column: pa.ChunkedArray) -> list:
    arr = column.combine_chunks()
    if not pa.types.is_list(arr.type):
        return arr.to_pylist()
    outer = arr.offsets.to_numpy()
    values = arr.values
    if pa.types.is_list(values.type):  # list<list<…>>: rows of [n, k] when every inner has length k
        inner = values.offsets.to_numpy()
        leaf = values.values.to_numpy(zero_copy_only=False)
        widths = np.diff(inner)
        if len(widths) and np.all(widths == widths[0]):
            k = int(widths[0])
            mat = leaf[inner[0]:inner[0] + len(widths) * k].reshape(-1, k)
            return [mat[a:b] for a, b in zip(outer[:-1], outer[1:], strict=True)]
        return [[leaf[inner[i]:inner[i + 1]] for i in range(a, b)] for a, b in zip(outer[:-1], outer[1:], strict=True)]
    flat = values.to_numpy(zero_copy_only=False)
    return [flat[a:b] for a, b in zip(outer[:-1], outer[1:], strict=True)]


def rows_of(table: pa.Table) -> list[dict]:
    """A table's rows as dicts; list columns become numpy arrays (views, no copies)."""
    columns = {name: _split(table.column(name)) for name in table.column_names}
    return [{name: columns[name][i] for name in columns} for i in range(table.num_rows)]
