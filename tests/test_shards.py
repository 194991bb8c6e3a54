"""`shards.gather`, the shard map's bookkeeping (no Ray): rows arrive in any order and possibly
twice; each output shard is written once, in its input's order, when its last row is in."""

import pyarrow as pa
import pytest

from fusion_ray import io
from fusion_ray.shards import columns_key, gather, map_shards

SCHEMA = pa.schema([("sample_id", pa.string()), ("value", pa.int64())])


def batch(rows: list[tuple[str, str, int]], dropped: list[bool] | None = None) -> pa.Table:
    cols = {"path": [f"/in/{shard}" for shard, _, _ in rows], "sample_id": [s for _, s, _ in rows],
            "value": [v for _, _, v in rows]}
    if dropped is not None:
        cols["dropped"] = dropped
    return pa.table(cols)


def test_shards_are_written_once_complete_in_input_order_and_a_repeat_keeps_the_first_copy(tmp_path):
    out = io.begin(str(tmp_path / "o"), "fp", False)
    expected = {"a.parquet": ["x", "y"], "b.parquet": ["z"]}
    pending = {name: {} for name in expected}
    keys = columns_key("sample_id")
    gather(batch([("a.parquet", "y", 2), ("b.parquet", "z", 3)]), pending, expected, out, keys)
    assert pending["b.parquet"] is None and out.has("b.parquet") and not out.has("a.parquet")
    gather(batch([("a.parquet", "y", 99), ("a.parquet", "x", 1), ("b.parquet", "z", 99)]), pending, expected,
           out, keys)  # a retried task sends y and z again
    assert io.read_table(out.path("a.parquet")).to_pylist() == [{"sample_id": "x", "value": 1},
                                                                 {"sample_id": "y", "value": 2}]
    assert io.read_table(out.path("b.parquet")).column("value").to_pylist() == [3]


def test_dropped_rows_count_as_done_and_a_shard_of_only_dropped_rows_is_written_empty(tmp_path):
    out = io.begin(str(tmp_path / "o"), "fp", False)
    expected = {"a.parquet": ["x", "y"], "b.parquet": ["z"]}
    pending = {name: {} for name in expected}
    n = gather(batch([("a.parquet", "x", 1), ("a.parquet", "y", 2), ("b.parquet", "z", 3)], [False, True, True]),
               pending, expected, out, columns_key("sample_id"), dropped="dropped", empty=SCHEMA)
    assert n == 2
    assert io.read_table(out.path("a.parquet")).to_pylist() == [{"sample_id": "x", "value": 1}]
    assert io.read_table(out.path("b.parquet")).num_rows == 0
    assert io.read_table(out.path("b.parquet")).schema == SCHEMA


def test_a_shard_with_nothing_to_map_is_written_empty_without_any_pool(tmp_path):
    out = io.begin(str(tmp_path / "o"), "fp", False)
    assert map_shards([], {"e.parquet": []}, out, object, udf_kwargs={}, keys=columns_key("sample_id"), batch_size=1,
                      concurrency=1, resources={}, name="t", what="test", empty=SCHEMA) == 0
    assert io.read_table(out.path("e.parquet")).num_rows == 0
    with pytest.raises(ValueError, match="test: input shard f.parquet has no rows"):
        map_shards([], {"f.parquet": []}, out, object, udf_kwargs={}, keys=columns_key("sample_id"), batch_size=1,
                   concurrency=1, resources={}, name="t", what="test")
