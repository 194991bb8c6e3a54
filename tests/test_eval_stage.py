"""The eval stage: held-out bpb per arm and domain, and the report files."""

import json

import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.evaluate import stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731


def test_eval_scores_every_arm_and_writes_the_report(tiny_models, tmp_path, ray_local):
    train = write_jsonl(tmp_path / "t.jsonl", chat_rows(4))
    comp = write_jsonl(tmp_path / "c.jsonl", chat_rows(6, "computing", start=100))
    eng = write_jsonl(tmp_path / "e.jsonl", chat_rows(5, "english", start=200))
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [train], eval={"num_cpus": 0.5})
    cfg.data.heldout = [type(cfg.data.train[0])(path=str(comp), domain="computing"),
                        type(cfg.data.train[0])(path=str(eng), domain="english")]
    result = stage.run(cfg, log=QUIET)
    report = json.loads(open(f"{result.dir}/report.json").read())
    assert set(report["bpb"]) == {"source:gpt", "pivot"}, "no trained arms exist yet: only these"
    for values in report["bpb"].values():
        assert set(values) == {"computing", "english"}
        assert all(2.0 < v < 20.0 for v in values.values()), values  # untrained 512-token models
    assert report["bpb"]["pivot"] != report["bpb"]["source:gpt"]
    assert open(f"{result.dir}/report.png", "rb").read(4) == b"\x89PNG"
    assert "| pivot |" in open(f"{result.dir}/report.md").read()
    assert io.read_manifest(result.dir)["rows"] == {"computing": 6, "english": 5}
    assert stage.run(cfg, log=QUIET).status == "skipped"


def test_bad_heldout_row_is_named(tiny_models, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat_rows(1)[0], "{not json"])
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [bad])
    cfg.data.heldout = [type(cfg.data.train[0])(path=str(bad), domain="x")]
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: invalid JSON"):
        stage.heldout(cfg)
