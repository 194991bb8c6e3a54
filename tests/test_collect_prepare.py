"""The prepare stage: JSONL / Parquet / HF-on-disk corpora, rejects with reasons, counts, skip."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import corpus as corpus_reading
from fusion_ray import io, schema
from fusion_ray.prepare import stage as prepare


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
    assert result.figures["rows"] == {"in": 32, "out": 26, "rejected": 6, "truncated": 1}
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
    assert prepare.run(cfg, log=lambda *_: None).status == "done"
    assert prepare.run(cfg, log=lambda *_: None).status == "skipped"
    write_jsonl(corpus, chat_rows(6))
    assert prepare.run(cfg, log=lambda *_: None).figures["rows"]["out"] == 6


def test_prepare_reads_parquet_sharegpt_and_hf_disk_datasets(tmp_path, models):
    import datasets

    share = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Q{i}?"},
                                               {"from": "gpt", "value": f"Answer {i}."}]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "share.parquet")
    disk = tmp_path / "hfds"
    datasets.Dataset.from_list(chat_rows(3, "english")).save_to_disk(str(disk))
    cfg = _config(tmp_path, models, [tmp_path / "share.parquet", disk])
    result = prepare.run(cfg, log=lambda *_: None)
    assert result.figures["rows"]["out"] == 7 and result.figures["rows"]["rejected"] == 0
    ids = pq.read_table(cfg.stage_dir("prepare")).column("sample_id").to_pylist()
    assert ids == ["s0", "s1", "s2", "s3", "english-0", "english-1", "english-2"]


def test_max_rows_caps_a_corpus(tmp_path, models):
    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(30))
    cfg = _config(tmp_path, models, [corpus])
    cfg.data.train[0].max_rows = 7
    assert prepare.run(cfg, log=lambda *_: None).figures["rows"]["out"] == 7


def _good(i: int) -> bytes:
    return json.dumps(chat_rows(1, start=i)[0]).encode() + b"\n"


def test_undecodable_deep_and_overlong_lines_become_rejected_rows(tmp_path, models):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    nested = {"id": "nested", **chat, "meta": json.loads("[" * 80 + "]" * 80)}
    lines = [
        _good(0),
        b'{"id": "latin", "messages": "caf\xe9"}\n',  # 1: not UTF-8
        b"[" * 100_000 + b"\n",  # 2: nested past json's own recursion limit
        json.dumps(nested).encode() + b"\n",  # 3: valid JSON, nested past 64
        b'{"id": "huge", "pad": "' + b"x" * (corpus_reading.MAX_LINE_BYTES + 10) + b'"}\n',  # 4: over the line bound
        _good(5),  # read after skipping line 4 to its newline
        b'{"id": 1' + b"1" * 5000 + b", " + json.dumps(chat).encode()[1:] + b"\n",  # 6: 5000-digit int
        json.dumps({"id": "surrogate", "messages": [{"role": "user", "content": "\ud800"},
                                                    {"role": "assistant", "content": "a"}]}).encode() + b"\n",
        json.dumps({"id": "listrole", "messages": [{"role": ["user"], "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}).encode() + b"\n",
        json.dumps({"id": "asstfirst", "messages": [{"role": "assistant", "content": "a"}]}).encode() + b"\n",
        json.dumps([1, 2]).encode() + b"\n",  # 10: not an object
        json.dumps({"id": "x" * 2000, **chat}).encode() + b"\n",  # 11: id over 1024 chars
        b"\n",
        _good(13),
        b'{"id": "tail", "pad": "' + b"y" * (corpus_reading.MAX_LINE_BYTES + 10),  # 14: over-long, no newline at all
    ]
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_bytes(b"".join(lines))
    cfg = _config(tmp_path, models, [corpus])
    result = prepare.run(cfg, log=lambda *_: None)
    out = cfg.stage_dir("prepare")
    kept = pq.read_table(out).to_pylist()
    assert [(r["sample_id"], r["source_row"]) for r in kept] == [("computing-0", 0), ("computing-5", 5),
                                                                 ("computing-13", 13)]
    rejected = {r["source_row"]: r for r in pq.read_table(f"{out}/_rejected").to_pylist()}
    assert all(r["source_file"] == str(corpus) for r in rejected.values())
    reasons = {row: r["reason"] for row, r in rejected.items()}
    assert sorted(reasons) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 14]
    bad_byte = lines[1].index(b"\xe9")
    assert reasons[1] == f"invalid UTF-8 at byte {bad_byte} of the line"
    assert reasons[2] == reasons[3] == "JSON nested deeper than 64 levels"
    assert reasons[4] == f"line longer than 8 MiB ({len(lines[4]):,} bytes)"
    assert reasons[14] == f"line longer than 8 MiB ({len(lines[14]):,} bytes)"
    assert reasons[6].startswith("invalid JSON: Exceeds the limit (4300 digits)")
    assert reasons[7] == "messages[0].content: not valid Unicode (a lone surrogate at character 0)"
    assert reasons[8] == "messages[0].role: unknown role ['user']"
    assert reasons[9].startswith("the conversation starts with an assistant turn")
    assert reasons[10] == "row is a list, not an object"
    assert reasons[11] == "sample id longer than 1024 characters"
    assert len(rejected[4]["raw"]) == corpus_reading.RAW_CHARS and rejected[4]["raw"].startswith('{"id": "huge"')
    assert "caf\\xe9" in rejected[1]["raw"]
    assert result.figures["rows"] == {"in": 14, "out": 3, "rejected": 11, "truncated": 0}
    assert io.read_manifest(out)["rows"]["rejected"] == 11


def test_an_empty_corpus_fails_prepare_naming_it_and_commits_nothing(tmp_path, models):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cfg = _config(tmp_path, models, [good, empty])
    with pytest.raises(prepare.EmptyCorpus) as err:
        prepare.run(cfg, log=lambda *_: None)
    assert str(err.value) == f"prepare: no usable rows in data.train.1 ({empty}): no rows"
    assert io.read_manifest(cfg.stage_dir("prepare")) is None
    assert not io.is_done(cfg.stage_dir("prepare"), prepare.fingerprint(cfg))


def test_a_corpus_whose_every_row_is_rejected_fails_prepare_with_its_reasons(tmp_path, models):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(3))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"{not json\n\xff\xfe\n" + b'{"messages": []}\n' + b"[1]\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _config(tmp_path, models, [bad, good, empty])
    with pytest.raises(prepare.EmptyCorpus) as err:
        prepare.run(cfg, log=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"prepare: no usable rows in data.train.0 ({bad}): all 4 row(s) rejected, e.g. "
                              "bad.jsonl row 0: invalid JSON: Expecting property name enclosed in double quotes "
                              "at column 2; "
                              "bad.jsonl row 1: invalid UTF-8 at byte 0 of the line; "
                              "bad.jsonl row 2: 'messages' must be a non-empty list")
    assert f"| data.train.2 ({empty}): no rows" in message and "data.train.1" not in message
    assert message.endswith("_rejected")
    assert io.read_manifest(cfg.stage_dir("prepare")) is None


def test_cli_prepare_of_an_empty_corpus_exits_2_in_one_line(tmp_path, models):
    import subprocess
    import sys
    from pathlib import Path

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(_config(tmp_path, models, [empty]).to_dict()))  # JSON is YAML
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "fusion_ray.cli", "prepare", str(config)], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: [prepare] failed: EmptyCorpus: prepare: no usable rows in data.train.0 ({empty}): "
                           f"no rows; traceback in {tmp_path / 'work' / 'logs'}/prepare-"), line
    assert not (tmp_path / "work" / "prepared").exists()
