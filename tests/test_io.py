"""Stage artifacts: atomic publish, resume of a partial stage, skip check, manifests."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_ray import io


def _table(n: int) -> pa.Table:
    return pa.table({"x": list(range(n))})


def test_commit_publishes_atomically_with_manifest(tmp_path):
    final = str(tmp_path / "collect" / "pivot")
    out = io.StageOutput(final, "fp1")
    out.write_table("part-00000.parquet", _table(3))
    assert not os.path.exists(final), "nothing visible before commit"
    assert not io.is_done(final, "fp1")
    out.commit(io.Manifest(stage="collect", fingerprint="", config_hash="c", rows={"out": 3}),
               config={"name": "t"})
    assert io.is_done(final, "fp1") and not io.is_done(final, "fp2")
    manifest = io.read_manifest(final)
    assert manifest["rows"] == {"out": 3} and manifest["stage"] == "collect"
    assert manifest["versions"]["pyarrow"] == pa.__version__
    assert manifest["wall_time_s"] >= 0
    assert json.loads((tmp_path / "collect/pivot/_config.json").read_text()) == {"name": "t"}
    assert not os.path.exists(final + ".partial")
    assert sorted(os.listdir(final)) == ["_config.json", "_manifest.json", "part-00000.parquet"]


def test_partial_stage_resumes_with_same_fingerprint_and_resets_otherwise(tmp_path):
    final = str(tmp_path / "align")
    first = io.StageOutput(final, "fp1")
    first.write_table("a.parquet", _table(1))
    # the run dies here; a rerun with the same fingerprint keeps the finished shard
    with open(first.path("b.parquet.tmp-1234"), "wb") as fh:  # what a killed writer leaves
        fh.write(b"PAR1 half")
    again = io.StageOutput(final, "fp1")
    assert again.has("a.parquet") and not again.has("b.parquet")
    assert not io.exists(again.path("b.parquet.tmp-1234"))
    # a rerun under another config starts clean
    changed = io.StageOutput(final, "fp2")
    assert not changed.has("a.parquet")


def test_begin_skips_a_done_output_unless_forced_and_resumes_a_partial_one(tmp_path):
    final = str(tmp_path / "fuse" / "gpt")
    first = io.begin(final, "fp1")
    first.write_table("a.parquet", _table(1))
    resumed = io.begin(final, "fp1")  # the first run died before its commit
    assert resumed.has("a.parquet")
    resumed.commit(io.Manifest(stage="fuse", fingerprint="", config_hash="c"))
    assert io.begin(final, "fp1") is None, "done: the stage skips"
    forced = io.begin(final, "fp1", force=True)
    assert forced is not None and not forced.has("a.parquet") and io.is_done(final, "fp1")
    assert io.begin(final, "fp2") is not None, "another fingerprint runs again"


def test_finished_reads_an_inputs_manifest_or_names_the_stage_to_run(tmp_path):
    final = str(tmp_path / "fused" / "gpt")
    with pytest.raises(FileNotFoundError, match=f"no finished fuse stage at {final}: run `fuse` first"):
        io.finished(final, "fuse")
    io.StageOutput(final, "fp").commit(io.Manifest(stage="fuse", fingerprint="", config_hash="c"))
    assert io.finished(final, "fuse")["fingerprint"] == "fp"


def test_recommit_replaces_a_stale_output(tmp_path):
    final = str(tmp_path / "fuse")
    old = io.StageOutput(final, "old")
    old.write_table("a.parquet", _table(1))
    old.commit(io.Manifest(stage="fuse", fingerprint="", config_hash="c"))
    new = io.StageOutput(final, "new")
    new.write_table("b.parquet", _table(2))
    new.commit(io.Manifest(stage="fuse", fingerprint="", config_hash="c"))
    assert io.is_done(final, "new")
    assert io.list_files(final) == [f"{final}/b.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["fuse"]


def test_killed_writer_leaves_no_visible_shard(tmp_path):
    """A process killed mid-write leaves at most a temp file that readers ignore."""
    target = tmp_path / "shard.parquet"
    code = (
        "import os, pyarrow as pa, pyarrow.parquet as pq\n"
        "orig = pq.write_table\n"
        "def dying(table, where, **kw):\n"
        "    orig(table, where, **kw); os._exit(9)\n"
        "pq.write_table = dying\n"
        "from fusion_ray import io\n"
        f"io.write_parquet_atomic({str(target)!r}, pa.table({{'x': [1]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 9
    assert not target.exists()
    assert io.list_files(str(tmp_path)) == []
    io.write_parquet_atomic(str(target), _table(2))
    assert pq.read_table(target).num_rows == 2


def test_file_uri_and_mock_filesystem_uri(tmp_path):
    uri = f"file://{tmp_path}/w/x.json"
    io.write_json_atomic(uri, {"a": 1})
    assert json.loads(io.read_text(uri)) == {"a": 1}
    assert io.exists(f"{tmp_path}/w/x.json")
    fs, path = io.resolve("mock:///bucket/key")
    assert not io.is_local("mock:///bucket/key") and path


def test_remote_stage_uses_manifest_as_commit_marker():
    """On an object store the manifest, written last, is what marks a stage done."""
    final = "mock:///bucket/run/collect"
    out = io.StageOutput(final, "fp")
    assert not out.atomic_rename and out.dir == final


def test_fingerprints_are_stable_and_sensitive(tmp_path):
    assert io.fingerprint({"a": 1, "b": 2}) == io.fingerprint({"b": 2, "a": 1})
    assert io.fingerprint({"a": 1}) != io.fingerprint({"a": 2})
    f = tmp_path / "data.jsonl"
    f.write_text("x\n")
    h1 = io.hash_location(str(f))
    f.write_text("xy\n")
    assert io.hash_location(str(f)) != h1
    assert io.hash_location("org/model", revision="main") != io.hash_location("org/model")


@pytest.mark.parametrize("name", ["x.parquet.tmp-1234", "_manifest.json"])
def test_list_files_ignores_temp_and_non_parquet(tmp_path, name):
    (tmp_path / name).write_text("")
    assert io.list_files(str(tmp_path)) == []
