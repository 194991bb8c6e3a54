"""Implicit fusion's evaluation: the numbers of the report (`evaluate/implicit.tally`), its files,
and the config that makes the arms answer the held-out prompts."""

import json

import pytest

from fusion_ray.evaluate.implicit import eval_config, tally
from fusion_ray.evaluate.report import chart, implicit_markdown

PROMPTS = {"m1": "math", "m2": "math", "m3": "math", "m4": "math", "c1": "code", "c2": "code",
           "o1": "chat", "o2": "chat"}


def row(arm, pid, correct=None, reward=None):
    verifiable = PROMPTS[pid] != "chat"
    return {"source": arm, "prompt_id": pid, "domain": PROMPTS[pid], "verifiable": verifiable,
            "correct": correct if verifiable else None,
            "reward": reward if reward is not None else float(bool(correct))}


def test_accuracy_counts_unanswered_prompts_as_wrong_and_win_rate_counts_ties_half():
    rows = [
        row("pivot", "m1", True), row("pivot", "m2", False), row("pivot", "m3", False),  # m4 unanswered
        row("pivot", "c1", False), row("pivot", "c2", False), row("pivot", "o1", reward=0.2),
        row("pivot", "o2", reward=0.5),
        row("sft", "m1", True), row("sft", "m2", True), row("sft", "m3", False), row("sft", "m4", True),
        row("sft", "c1", True), row("sft", "c2", False), row("sft", "o1", reward=0.9), row("sft", "o2", reward=0.5),
    ]
    out = tally(rows, PROMPTS, ["pivot", "sft"], by_reward_model=True)
    assert out["accuracy"] == {"pivot": {"code": 0.0, "math": 0.25}, "sft": {"code": 0.5, "math": 0.75}}
    assert "chat" not in out["accuracy"]["pivot"]  # open prompts have no accuracy
    assert out["mean_reward"]["pivot"]["chat"] == pytest.approx(0.35)
    assert out["mean_reward"]["pivot"]["math"] == pytest.approx(0.25)  # the unanswered prompt scores 0
    # sft vs pivot, prompt by prompt: m1 tie, m2 win, m3 tie, m4 win (pivot none), c1 win, c2 tie, o1 win, o2 tie
    assert out["win_rate_vs_pivot"] == {"sft": pytest.approx((4 * 1 + 4 * 0.5) / 8)}
    assert out["counts"]["pivot"]["math"] == {"prompts": 4, "answered": 3, "correct": 1}
    assert out["counts"]["sft"]["chat"] == {"prompts": 2, "answered": 2, "correct": None}
    assert out["by"] == "reward_model"


def test_without_the_pivot_there_is_no_win_rate():
    out = tally([row("sft", "m1", True)], {"m1": "math"}, ["sft"], by_reward_model=False)
    assert out["win_rate_vs_pivot"] == {} and out["accuracy"] == {"sft": {"math": 1.0}} and out["by"] == "verifier"


def test_the_fused_arm_is_compared_with_the_best_single_source_arm_over_all_verifiable_prompts():
    rows = [row("dpo", "m1", True), row("dpo", "m2", True), row("dpo", "c1", True),  # 3 of 6
            row("only-a", "m1", True), row("only-a", "m2", True), row("only-a", "m3", True),
            row("only-a", "m4", True),  # 4 of 6, all math
            row("only-b", "c1", True), row("only-b", "c2", True), row("only-b", "o1", reward=1.0)]  # 2 of 6
    out = tally(rows, PROMPTS, ["dpo", "only-a", "only-b"], by_reward_model=False)
    assert out["accuracy_all"] == {"dpo": 0.5, "only-a": pytest.approx(4 / 6), "only-b": pytest.approx(2 / 6)}
    assert out["best_single"] == "only-a"
    assert out["fused_vs_best_single"] == pytest.approx(0.5 - 4 / 6)
    none = tally(rows[:3], PROMPTS, ["dpo"], by_reward_model=False)
    assert none["best_single"] is None and none["fused_vs_best_single"] is None


def test_the_report_files_show_every_arm():
    rows = [row("pivot", "m1", False), row("dpo", "m1", True), row("pivot", "o1", reward=0.1),
            row("dpo", "o1", reward=0.3)]
    prompts = {"m1": "math", "o1": "chat"}
    report = {"method": "implicit", **tally(rows, prompts, ["pivot", "dpo"], True),
              "labels": {"pivot": "pivot", "dpo": "SFT+DPO"}, "models": {"pivot": "demo:x", "dpo": "/w/dpo"},
              "config": "t"}
    md = implicit_markdown(report)
    assert "| SFT+DPO | 100.0% |" in md and "| pivot | 0.0% |" in md
    assert "| SFT+DPO | 0.3 | 1 | 100.0% |" in md and "| pivot | 0.1 | 0 | — |" in md
    png = chart(report)
    assert png.startswith(b"\x89PNG") and len(png) > 3000
    json.dumps(report)  # the report is JSON as it stands


def test_the_answering_config_makes_the_arms_its_greedy_sources_on_the_heldout_prompts(tmp_path):
    from fusion_ray.config import FusionConfig, parse_config

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}) + "\n")
    held = tmp_path / "h.jsonl"
    held.write_text(prompts.read_text().replace('"a"', '"h"'))
    model = tmp_path / "m"
    model.mkdir()
    cfg = parse_config({
        "name": "t", "workdir": str(tmp_path / "w"), "method": "implicit",
        "pivot": {"name": "pivot", "path": str(model), "tokenizer": str(model)},  # the arm's name too
        "sources": [{"name": "s", "path": str(model)}],
        "implicit": {"prompts": [{"path": str(prompts), "verify": "math"}], "single_source_arms": ["s"],
                     "heldout": [{"path": str(held), "verify": "math", "domain": "arith"},
                                 {"path": str(held), "verify": "none", "domain": "open"}], "samples": 4,
                     "reward": {"path": str(model)}},
        # a judge of the open held-out answers: the answering sub-config has no held-out prompts of its own
        "eval": {"max_new_tokens": 33, "chat": {"judge": {"reward_model": {"path": str(model)},
                                                          "modes": ["pairwise"], "baseline": ["pivot", "sft"]}}}},
        source="test")
    sub = eval_config(cfg, {"pivot": str(model), "sft": "/w/sft", "dpo": "/w/dpo", "only-s": "/w/dpo-only-s"})
    assert [s.name for s in sub.sources] == ["pivot", "sft", "dpo", "only-s"]
    assert [s.path for s in sub.sources] == [str(model), "/w/sft", "/w/dpo", "/w/dpo-only-s"]
    assert [s.tokenizer for s in sub.sources] == [str(model), None, None, None]  # trained arms carry their tokenizer
    assert sub.implicit.single_source_arms == [] and FusionConfig.from_wire(sub.to_wire()) == sub  # valid on a worker
    assert all(s.sampling.temperature == 0 and s.sampling.max_tokens == 33 for s in sub.sources)
    assert sub.implicit.samples == 1 and [c.path for c in sub.implicit.prompts] == [str(held)] * 2
    assert sub.eval.chat is None and cfg.eval.chat.judge.baselines == ["pivot", "sft"]
    assert sub.workdir == f"{tmp_path}/w/_eval" and cfg.workdir == f"{tmp_path}/w"  # the run's own config unchanged
    assert cfg.stages()[-1] == "eval"


def test_open_answers_are_the_unverified_prompts_answered_by_each_arm():
    from fusion_ray.evaluate.implicit import open_answers

    prompts = [{"prompt_id": "m1", "domain": "arith", "verify": "math", "messages": '[{"role": "user", "content": "1+1?"}]'},
               {"prompt_id": "o1", "domain": "open", "verify": "none", "messages": '[{"role": "user", "content": "Define X."}]'},
               {"prompt_id": "o2", "domain": "open", "verify": "none",
                "messages": '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, '
                            '{"role": "user", "content": "Define Y."}]'}]
    rows = [{"source": arm, "prompt_id": pid, "response": f"{arm}:{pid}"}
            for arm in ("pivot", "sft") for pid in ("m1", "o1", "o2") if (arm, pid) != ("sft", "o2")]
    questions, answers = open_answers(prompts, rows, ["pivot", "sft"])
    assert [q["question_id"] for q in questions] == ["o1", "o2"] and questions[0]["turns"] == ["Define X."]
    assert questions[1]["turns"] == ["user: Hi\n\nassistant: Hello\n\nuser: Define Y."]  # earlier turns kept as context
    assert answers["pivot"] == [{"arm": "pivot", "question_id": "o1", "answers": ["pivot:o1"]},
                                {"arm": "pivot", "question_id": "o2", "answers": ["pivot:o2"]}]
    assert [a["question_id"] for a in answers["sft"]] == ["o1"]  # an unanswered prompt is left out
