"""Parquet schemas of every stage output, declared once, checked at stage boundaries.

`prepared/`  one row per conversation, rendered once with the pivot's chat template.
`prepared/_rejected/`  corpus rows that could not be used, with the reason.
`logits/<model>/`  per-token top-k next-token log-probs of one model.
`aligned/<source>/`  a source's distributions moved onto pivot positions and ids.
`fused/<pair>/`  the fused teacher per pivot position, ready for training.
Implicit fusion: `samples/_prompts/` the prompts, checked; `samples/<source>/` n responses
per prompt; `rewards/` every response with its reward and verdict.
`train` and `merge` write HF model directories (`MODEL_DIR_FILES`); `eval` writes
`report.json`.

`check_table`/`check_file` raise `SchemaError` naming the file and the column; `read_shard`
reads a shard after checking it. `ShardMismatch`: shards of one name, from different stages,
that do not hold the same samples in the same order.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

_ids = pa.list_(pa.int32())
_topk_ids = pa.list_(pa.list_(pa.int32()))
_topk_lp = pa.list_(pa.list_(pa.float16()))

PREPARED = pa.schema([
    ("sample_id", pa.string()),
    ("domain", pa.string()),
    ("text", pa.string()),  # the conversation rendered with the pivot's template
    ("span_starts", _ids),  # char offsets of assistant spans (the scored part)
    ("span_ends", _ids),
    ("truncated", pa.bool_()),
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
])

REJECTED = pa.schema([
    ("source_file", pa.string()),
    ("source_row", pa.int64()),
    ("sample_id", pa.string()),
    ("reason", pa.string()),
    ("raw", pa.string()),  # the row as JSON, truncated
])

LOGITS = pa.schema([
    ("sample_id", pa.string()),
    ("input_ids", _ids),
    ("offsets", _ids),  # char end offset of each token
    ("loss_mask", pa.list_(pa.bool_())),  # token t+1 is scored
    ("topk_ids", _topk_ids),  # [T-1][k]
    ("topk_logprobs", _topk_lp),  # [T-1][k], normalised over the full vocab
    ("gold_logprob", pa.list_(pa.float32())),  # [T-1]
    ("nll_sum", pa.float64()),
    ("n_bytes", pa.int64()),
])

# With `align.prefix: exact`, a source's logits/ rows also hold, for each pivot boundary strictly
# inside one of its tokens (engines/conditioned.py): the stored row it conditions, the written
# prefix's length in bytes, log M(prefix) (the source's probability of the tokens extending it)
# and the top-k of those tokens with their log-probs (-inf padding).
CONDITIONED = pa.schema([
    ("cond_rows", _ids),
    ("cond_prefix", _ids),
    ("cond_mass", pa.list_(pa.float32())),
    ("cond_ids", _topk_ids),
    ("cond_logprobs", pa.list_(pa.list_(pa.float32()))),
])

# aligned/ and fused/ hold one top-k entry per SCORED pivot position (the True entries
# of the pivot's loss mask), in the pivot's vocabulary; padding has log-prob -inf.
ALIGNED = pa.schema([
    ("sample_id", pa.string()),
    ("topk_ids", _topk_ids),
    ("topk_logprobs", _topk_lp),
    ("transferred", pa.list_(pa.bool_())),  # the source's distribution reached this position
    ("source_ce", pa.float64()),  # the source's mean NLL per scored token, own tokenization
    ("source_bpb", pa.float64()),  # the source's bits per scored UTF-8 byte
    ("method", pa.string()),  # "offsets", "spans", "dtw" or "none"
])

FUSED = pa.schema([
    ("sample_id", pa.string()),
    ("domain", pa.string()),
    ("input_ids", _ids),  # pivot tokens
    ("loss_mask", pa.list_(pa.bool_())),
    ("topk_ids", _topk_ids),
    ("topk_logprobs", _topk_lp),
    ("transferred", pa.list_(pa.bool_())),  # a source with non-zero weight reached it
    ("weights", pa.list_(pa.float32())),  # per candidate (pivot first); MinCE is one-hot
])

SCHEMAS: dict[str, pa.Schema] = {
    "prepared": PREPARED,
    "rejected": REJECTED,
    "logits": LOGITS,
    "conditioned": CONDITIONED,
    "aligned": ALIGNED,
    "fused": FUSED,
}

MODEL_DIR_FILES = ("config.json", "tokenizer_config.json")  # plus *.safetensors


class SchemaError(ValueError):
    """A stage input that does not match its declared schema."""


# --- implicit fusion ------------------------------------------------------------------------

PROMPTS_DIR = "_prompts"  # below samples/: the checked prompt shards (a source may not take this name)
PROMPTS = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("verify", pa.string()),
                     ("messages", pa.string()),  # the chat as JSON: [{role, content}], the user's turn last
                     ("answer", pa.string()), ("tests", pa.string()), ("samples", pa.int32())])
SAMPLES = pa.schema([("prompt_id", pa.string()), ("source", pa.string()), ("sample_index", pa.int32()),
                     ("response", pa.string()), ("tokens", pa.int32()), ("finish_reason", pa.string())])
REWARDS = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("verify", pa.string()),
                     ("verifiable", pa.bool_()), ("source", pa.string()), ("sample_index", pa.int32()),
                     ("response", pa.string()), ("tokens", pa.int32()), ("finish_reason", pa.string()),
                     ("reward", pa.float64()), ("correct", pa.bool_()), ("verdict", pa.string())])


def check_schema(actual: pa.Schema, expected: pa.Schema | str, source: str) -> None:
    """Raise `SchemaError` naming `source` and the first missing or mistyped column.

    Extra columns are allowed; column order is not checked.
    """
    expected = SCHEMAS[expected] if isinstance(expected, str) else expected
    for want in expected:
        idx = actual.get_field_index(want.name)
        if idx < 0:
            raise SchemaError(f"{source}: missing column {want.name!r} (expected {want.type})")
        got = actual.field(idx).type
        if not got.equals(want.type):
            raise SchemaError(f"{source}: column {want.name!r} has type {got}, expected {want.type}")


def check_table(table: pa.Table, expected: pa.Schema | str, source: str) -> pa.Table:
    """Check a table and return it with columns in the declared order."""
    check_schema(table.schema, expected, source)
    expected = SCHEMAS[expected] if isinstance(expected, str) else expected
    return table.select(expected.names)


class ShardMismatch(ValueError):
    """Inputs of one shard that do not belong together (other samples, or in another order)."""


def check_file(path: str, expected: pa.Schema | str) -> None:
    """Check a Parquet file's schema from its footer, without reading the data."""
    from fusion_ray.io import resolve

    fs, p = resolve(path)
    try:
        schema = pq.read_schema(p, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"{path}: not a readable Parquet file ({err})") from None
    check_schema(schema, expected, path)


def read_shard(path: str, expected: pa.Schema | str) -> pa.Table:
    """One stage shard (local or on an object store), its schema checked first (`check_file`)."""
    from fusion_ray.io import read_table

    check_file(path, expected)
    return read_table(path)
