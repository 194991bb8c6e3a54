"""The prepare stage: JSONL / Parquet / HF-on-disk corpora, rejects with reasons, counts, skip."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io, schema
from fusion_ray.collect import prepare


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"pivot": tiny_models("qwen2", "deepseek"), "src": tiny_models("gpt2", "gpt2")}


def _config(tmp_path, models, train, **kw):
    return make_config(tmp_path / "work", models["pivot"], {"src": models["src"]}, train, **kw)


def test_prepare_jsonl_with_bad_rows(tmp_path, models):
    bad = [
        "{not json",
        {"id": "noasst", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "empty", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"id": "role", "messages": [{"role": "bot", "content": "hi"}]},
        {"id": "long", "messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]},
        chat_rows(1)[0],  # a duplicate of row 0
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(25) + bad)
    cut = {"id": "cut", "messages": [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "z " * 300}]}
    write_jsonl(tmp_path / "c2.jsonl", [cut])
    cfg = _config(tmp_path, models, [corpus, tmp_path / "c2.jsonl"])
    result = prepare.run(cfg, log=lambda *_: None)
    assert result["rows"] == {"in": 32, "out": 26, "rejected": 6, "truncated": 1}
    out = cfg.stage_dir("prepare")
    files = io.list_files(out)
    assert len(files) == 3  # shard_rows = 10
    for f in files:
        schema.check_file(f, "prepared")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.column("sample_id").to_pylist()[:3] == ["computing-0", "computing-1", "computing-2"]
    rejected = pq.read_table(f"{out}/_rejected").to_pylist()
    assert pq.read_table(out).num_rows == 26, "readers of prepared/ skip the rejected rows"
    reasons = {r["source_row"]: r["reason"] for r in rejected}
    assert reasons[25].startswith("invalid JSON") and reasons[26] == "no assistant turn"
    assert reasons[27] == "messages[1].content: empty content"
    assert reasons[28] == "messages[0].role: unknown role 'bot'"
    assert reasons[29] == "no assistant text within max_length"
    assert reasons[30] == "duplicate sample_id 'computing-0'"
    assert all(r["source_file"] == str(corpus) for r in rejected)
    assert json.loads([r for r in rejected if r["source_row"] == 26][0]["raw"])["id"] == "noasst"
    assert io.read_manifest(out)["rows"]["rejected"] == 6


def test_prepare_is_skipped_when_unchanged_and_rerun_when_data_changes(tmp_path, models):
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(5))
    cfg = _config(tmp_path, models, [corpus])
    assert prepare.run(cfg, log=lambda *_: None)["status"] == "done"
    assert prepare.run(cfg, log=lambda *_: None)["status"] == "skipped"
    write_jsonl(corpus, chat_rows(6))
    assert prepare.run(cfg, log=lambda *_: None)["rows"]["out"] == 6


def test_prepare_reads_parquet_sharegpt_and_hf_disk_datasets(tmp_path, models):
    import datasets

    share = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Q{i}?"},
                                               {"from": "gpt", "value": f"Answer {i}."}]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "share.parquet")
    disk = tmp_path / "hfds"
    datasets.Dataset.from_list(chat_rows(3, "english")).save_to_disk(str(disk))
    cfg = _config(tmp_path, models, [tmp_path / "share.parquet", disk])
    result = prepare.run(cfg, log=lambda *_: None)
    assert result["rows"]["out"] == 7 and result["rows"]["rejected"] == 0
    ids = pq.read_table(cfg.stage_dir("prepare")).column("sample_id").to_pylist()
    assert ids == ["s0", "s1", "s2", "s3", "english-0", "english-1", "english-2"]


def test_max_rows_caps_a_corpus(tmp_path, models):
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(30))
    cfg = _config(tmp_path, models, [corpus])
    cfg.data.train[0].max_rows = 7
    assert prepare.run(cfg, log=lambda *_: None)["rows"]["out"] == 7
