"""The eval stage: held-out bpb per arm and domain, chat evaluation and lm-eval, and the report files."""

import json
from pathlib import Path

import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.evaluate import stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731
LMEVAL_TASKS = Path(__file__).parent / "data" / "lmeval"


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


def test_eval_chat_answers_judges_and_lm_eval_in_the_report(tiny_models, tmp_path, ray_local, monkeypatch):
    """eval.chat and eval.lm_eval through the stage: two arms answer two two-turn questions (hf engine
    on Ray Data), a loopback judge grades them (single and pairwise), lm-eval runs a local task; the
    report carries each metric per arm with its interval next to bpb, the audit files are written,
    and a forced rerun re-scores from the saved answers and judgements with no judge call."""
    from judge_server import JudgeServer, rating_for, verdict_for

    train = write_jsonl(tmp_path / "t.jsonl", chat_rows(4))
    held = write_jsonl(tmp_path / "c.jsonl", chat_rows(3, "computing", start=100))
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["What is a parser?", "Say it shorter."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"],
         "reference": ["5", "20"]}])
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    with JudgeServer() as judge:
        chat = {"questions": str(questions), "arms": ["pivot", "source:gpt"], "engine": "hf", "num_cpus": 0.5,
                "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 12},
                "judge": {"url": judge.url, "model": "judge", "api_key_env": "JUDGE_KEY",
                          "modes": ["single", "pairwise"], "baseline": "pivot", "bootstrap": 200, "backoff_s": 0.01}}
        lm = {"tasks": ["fr_short_answer_mc"], "include_path": str(LMEVAL_TASKS), "arms": ["pivot"], "limit": 5,
              "apply_chat_template": False, "num_cpus": 0.5}
        cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                          [train], eval={"num_cpus": 0.5, "chat": chat, "lm_eval": lm})
        cfg.data.heldout = [type(cfg.data.train[0])(path=str(held), domain="computing")]
        result = stage.run(cfg, log=QUIET)
        calls = len(judge.calls)
        report = json.loads(open(f"{result.dir}/report.json").read())
        answers = [json.loads(line) for line in open(f"{result.dir}/chat_answers.jsonl")]
        assert sorted((a["arm"], a["question_id"]) for a in answers) == [
            ("pivot", "1"), ("pivot", "2"), ("source:gpt", "1"), ("source:gpt", "2")]
        assert all(len(a["answers"]) == 2 for a in answers)
        by = {(a["arm"], a["question_id"]): a["answers"] for a in answers}
        # the stand-in grades by length and prefers the longer answer: expectations from the answers alone
        for arm in ("pivot", "source:gpt"):
            want = sum(sum(rating_for(x) for x in by[arm, q]) / 2 for q in ("1", "2")) / 2
            assert report["chat"]["judge"]["arms"][arm]["single"]["mean"] == pytest.approx(want)
        pref = {"A": 1.0, "C": 0.5, "B": 0.0}
        want = sum(sum(pref[verdict_for(x, y)] for x, y in zip(by["source:gpt", q], by["pivot", q], strict=True)) / 2
                   for q in ("1", "2")) / 2
        pair = report["chat"]["judge"]["arms"]["source:gpt"]["pairwise"]["pivot"]
        assert pair["win_rate"] == pytest.approx(want) and pair["baseline"] == "pivot"
        assert calls == 2 * 2 * 2 + 2 * 2 * 2, "single: 2 arms × 2 questions × 2 turns; pairwise: both orders"
        assert all(c["auth"] == "Bearer sekret" for c in judge.calls)
        assert sum(1 for _ in open(f"{result.dir}/chat_judgements.jsonl")) == calls
        arms = json.loads(open(f"{result.dir}/chat_arms.json").read())
        assert arms["pivot"]["sampling"]["max_tokens"] == 12 and "{%" in arms["source:gpt"]["chat_template"]
        text = open(f"{result.dir}/report.md").read()
        bpb = report["bpb"]["pivot"]["computing"]
        assert f"| pivot | {bpb:.4f} |" in text, "the chat metrics sit next to the arm's bpb"
        assert "win rate vs pivot" in text and "fr_short_answer_mc" in text
        acc = report["lm_eval"]["results"]["pivot"]["fr_short_answer_mc"]
        assert 0.0 <= acc["acc"] <= 1.0 and acc["n"] == 5
        again = stage.run(cfg, force=True, log=QUIET)
        assert len(judge.calls) == calls, "a rerun re-scores from the saved judgements"
        rerun = json.loads(open(f"{again.dir}/report.json").read())
        assert rerun["chat"]["judge"]["arms"] == report["chat"]["judge"]["arms"]
        assert rerun["chat"]["judge"]["reused"] == calls and rerun["chat"]["judge"]["calls"] == 0
