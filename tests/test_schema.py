"""Stage schemas: declared once, checked at boundaries with errors naming file and column."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_ray import schema


def _logits_row() -> dict:
    return {
        "sample_id": ["s0"], "input_ids": [[1, 2, 3]], "offsets": [[1, 3, 5]],
        "loss_mask": [[False, True]], "topk_ids": [[[2, 7], [3, 1]]],
        "topk_logprobs": [[[-0.1, -2.5], [-0.3, -1.9]]], "gold_logprob": [[-0.1, -0.3]],
        "nll_sum": [0.3], "n_bytes": [2],
    }


def test_every_parquet_stage_has_a_schema():
    assert set(schema.SCHEMAS) == {"prepared", "rejected", "logits", "conditioned", "aligned", "fused"}
    # the conditioned entries are extra columns of a source's logits/ rows, never a replacement
    assert not set(schema.CONDITIONED.names) & set(schema.LOGITS.names)


def test_logits_contract_types():
    s = schema.LOGITS
    assert s.field("input_ids").type == pa.list_(pa.int32())
    assert s.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16()))
    assert s.field("gold_logprob").type == pa.list_(pa.float32())


def test_valid_table_passes_and_is_reordered():
    table = pa.table(_logits_row(), schema=schema.LOGITS)
    shuffled = table.select(list(reversed(table.column_names)))
    assert schema.check_table(shuffled, "logits", "x.parquet").column_names == schema.LOGITS.names


def test_missing_column_names_file_and_column(tmp_path):
    table = pa.table(_logits_row(), schema=schema.LOGITS).drop_columns(["gold_logprob"])
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    with pytest.raises(schema.SchemaError, match=r"part-0.parquet: missing column 'gold_logprob'"):
        schema.check_file(str(path), "logits")


def test_wrong_type_names_both_types(tmp_path):
    row = _logits_row()
    table = pa.table(row, schema=schema.LOGITS).set_column(
        4, "topk_ids", pa.array(row["topk_ids"], pa.list_(pa.list_(pa.int64()))))
    with pytest.raises(schema.SchemaError, match=r"'topk_ids' has type list<item: list<item: int64>>"):
        schema.check_table(table, "logits", "f.parquet")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_text("not parquet")
    with pytest.raises(schema.SchemaError, match="junk.parquet: not a readable Parquet file"):
        schema.check_file(str(path), "prepared")
