"""The chat judge (fusion_ray.evaluate.judging) against a deterministic local judge on loopback.

No Ray. Expected numbers come from the stand-in's rules applied to the answers here
(tests/judge_server.py: rating_for, verdict_for), not from the code under test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from judge_server import JudgeServer, rating_for, verdict_for

from fusion_ray.config import JudgeConfig
from fusion_ray.evaluate.judging import judge_answers, parse_rating, parse_verdict

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Make it shorter."],
     "reference": None},
    {"question_id": "m1", "category": "math", "turns": ["What is 2+2?", "Double it."],
     "reference": ["REF-FOUR", "REF-EIGHT"]},
    {"question_id": "r1", "category": "reasoning", "turns": ["Is every square a rectangle?"],
     "reference": ["REF-YES"]},
    {"question_id": "w2", "category": "writing", "turns": ["Name a colour."]},  # no reference key at all
]
ANSWERS = {
    "pivot": {"81": ["Rain falls, soft and grey, on the old stone wall", "Rain, grey wall"],
              "m1": ["4", "It is 8 since 4 doubled is 8"],
              "r1": ["Yes, a square has four right angles and so is a rectangle."],
              "w2": ["Blue."]},
    "merged": {"81": ["Rain on roofs", "Rain, a long grey afternoon on the wall"],
               "m1": ["2 + 2 equals 4, the sum of two and two", "8"],
               "r1": ["Yes."],
               "w2": ["Green."]},  # as long as the pivot's: a tie
}


def answers(arms=("pivot", "merged")) -> dict[str, list[dict]]:
    return {arm: [{"arm": arm, "question_id": qid, "answers": a, "tokens": [len(x) for x in a],
                   "finish_reasons": ["stop"] * len(a)} for qid, a in ANSWERS[arm].items()] for arm in arms}


def judge(server: JudgeServer, **kw) -> JudgeConfig:
    base = {"url": server.url, "model": "judge-x", "backoff_s": 0.01, "timeout_s": 5, "bootstrap": 200}
    return JudgeConfig(**{**base, **kw})


def expected_single(arm: str) -> tuple[float, dict, dict]:
    per_q = {}
    by_turn: dict[int, list] = {}
    for q in QUESTIONS:
        qid = str(q["question_id"])
        r = [rating_for(a) for a in ANSWERS[arm][qid]]
        per_q[qid] = sum(r) / len(r)
        for t, x in enumerate(r, 1):
            by_turn.setdefault(t, []).append(x)
    cats: dict[str, list] = {}
    for q in QUESTIONS:
        cats.setdefault(q["category"], []).append(per_q[str(q["question_id"])])
    return (sum(per_q.values()) / len(per_q), {str(t): sum(v) / len(v) for t, v in by_turn.items()},
            {c: sum(v) / len(v) for c, v in cats.items()})


def n_turns() -> int:
    return sum(len(q["turns"]) for q in QUESTIONS)


def test_parsing():
    assert parse_rating("Good. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[ 9.5 ]]") == 9.5
    assert parse_rating("[[4]] first thought, final answer [[4]]") == 4.0
    assert parse_rating("Rating: 7") is None
    assert parse_rating("[[3]] no, [[8]]") is None  # two different ratings: not guessed
    assert parse_rating("[[11]]") is None and parse_rating("[[0]]") is None
    assert parse_rating(None) is None
    assert parse_verdict("so [[A]]") == "A" and parse_verdict("[[C]]") == "C"
    assert parse_verdict("[[A]] or maybe [[B]]") is None
    assert parse_verdict("A is better") is None


def test_single_and_pairwise_numbers_follow_the_judge(tmp_path):
    with JudgeServer() as server:
        cfg = judge(server, modes=["single", "pairwise"], baseline="pivot")
        res = judge_answers(cfg, QUESTIONS, answers(), str(tmp_path / "j"), log=lambda *_: None)
    for arm in ("pivot", "merged"):
        mean, by_turn, by_cat = expected_single(arm)
        s = res["arms"][arm]["single"]
        assert s["mean"] == pytest.approx(mean)
        assert s["by_turn"] == pytest.approx(by_turn) and s["by_category"] == pytest.approx(by_cat)
        assert s["n"] == n_turns() and s["unrated"] == 0 and s["questions"] == 4
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
    # pairwise: merged vs pivot, the stand-in prefers the longer answer in either position
    outcome = {"A": 1.0, "B": 0.0, "C": 0.5}
    per_q = []
    wins = ties = losses = 0
    for q in QUESTIONS:
        qid = str(q["question_id"])
        prefs = [outcome[verdict_for(m, p)] for m, p in zip(ANSWERS["merged"][qid], ANSWERS["pivot"][qid])]
        wins, ties, losses = wins + prefs.count(1.0), ties + prefs.count(0.5), losses + prefs.count(0.0)
        per_q.append(sum(prefs) / len(prefs))
    p = res["arms"]["merged"]["pairwise"]["pivot"]
    assert "pairwise" not in res["arms"]["pivot"]
    assert (p["wins"], p["ties"], p["losses"], p["inconsistent"]) == (wins, ties, losses, 0)
    assert p["win_rate"] == pytest.approx(sum(per_q) / len(per_q))
    assert p["baseline"] == "pivot" and p["n"] == n_turns()
    assert p["lc_win_rate"] is not None and p["lc_ci"][0] <= p["lc_ci"][1]
    # every distinct prompt called once: 2 arms × turns (single) + 2 orders × turns (pairwise)
    assert res["calls"] == len(server.calls) == 4 * n_turns() and res["reused"] == 0
    assert {c["model"] for c in server.calls} == {"judge-x"}
    assert {(c["temperature"], c["max_tokens"]) for c in server.calls} == {(0.0, 512)}
    # the audit records: one per judgement, with the prompt, the raw output and the parse
    rec = next(r for r in res["judgements"] if r["mode"] == "pairwise" and r["order"] == "BA")
    assert {"arm", "baseline", "question_id", "turn", "order", "sample", "messages", "output", "parsed",
            "judge_model"} <= set(rec)
    assert rec["parsed"] == parse_verdict(rec["output"]) and rec["judge_model"] == "judge-x"


def test_a_position_biased_judge_gives_ties(tmp_path):
    with JudgeServer(position_bias="A") as server:
        cfg = judge(server, modes=["pairwise"], baseline="pivot")
        res = judge_answers(cfg, QUESTIONS, answers(), str(tmp_path / "j"), log=lambda *_: None)
    p = res["arms"]["merged"]["pairwise"]["pivot"]
    assert (p["wins"], p["losses"], p["ties"], p["inconsistent"]) == (0, 0, n_turns(), n_turns())
    assert p["win_rate"] == 0.5 and p["ci"] == [0.5, 0.5]


def test_turn_two_shows_the_conversation_and_references_only_for_their_categories(tmp_path):
    with JudgeServer() as server:
        judge_answers(judge(server), QUESTIONS, answers(["pivot"]), str(tmp_path / "j"), log=lambda *_: None)
    prompts = [c["prompt"] for c in server.calls]
    assert len(prompts) == n_turns()
    for p in prompts:
        has_ref = "REF-" in p
        assert has_ref == ("What is 2+2?" in p or "square a rectangle" in p), p
    turn2 = [p for p in prompts if "Double it." in p]
    assert len(turn2) == 1
    assert "What is 2+2?" in turn2[0] and ANSWERS["pivot"]["m1"][0] in turn2[0]  # the arm's own first answer
    assert "REF-FOUR" in turn2[0] and "REF-EIGHT" in turn2[0]
    turn1 = [p for p in prompts if "What is 2+2?" in p and "Double it." not in p]
    assert "REF-FOUR" in turn1[0] and "REF-EIGHT" not in turn1[0]


def test_unparseable_outputs_are_counted_not_guessed(tmp_path):
    arms = answers(["pivot"])
    arms["pivot"][3] = {**arms["pivot"][3], "answers": ["NORATING here"]}
    with JudgeServer() as server:
        res = judge_answers(judge(server), QUESTIONS, arms, str(tmp_path / "j"), log=lambda *_: None)
    s = res["arms"]["pivot"]["single"]
    assert s["unrated"] == 1 and s["n"] == n_turns() - 1 and s["questions"] == 3


def test_retries_after_500s_and_timeouts_succeed(tmp_path):
    with JudgeServer(fail_first=2) as server:
        res = judge_answers(judge(server, max_retries=3), QUESTIONS, answers(["pivot"]), str(tmp_path / "a"),
                            log=lambda *_: None)
    assert res["failed"] == 0 and res["arms"]["pivot"]["single"]["n"] == n_turns()
    assert res["calls"] == len(server.calls) == 3 * n_turns() and res["retries"] == 2 * n_turns()
    assert sum(c["status"] == 500 for c in server.calls) == 2 * n_turns()
    # the first call of each prompt is held past the client's timeout; the retry is answered at once
    # (a timeout of 1 s leaves room for a loaded machine: at 0.3 s a retry itself timed out there)
    with JudgeServer(delay_first=1, delay_s=4.0) as server:
        t0 = time.monotonic()
        res = judge_answers(judge(server, timeout_s=1.0, max_retries=3, concurrency=8), QUESTIONS,
                            answers(["pivot"]), str(tmp_path / "b"), log=lambda *_: None)
        assert time.monotonic() - t0 < 12, "timed-out calls are retried, not waited for"
    assert res["failed"] == 0 and res["arms"]["pivot"]["single"]["mean"] == pytest.approx(expected_single("pivot")[0])
    assert res["calls"] == 2 * n_turns()


def test_a_call_that_keeps_failing_ends_failed_without_stalling(tmp_path):
    with JudgeServer(fail_match="Make it shorter.") as server:  # the writing question's second turn
        t0 = time.monotonic()
        res = judge_answers(judge(server, max_retries=2), QUESTIONS, answers(["pivot"]), str(tmp_path / "j"),
                            log=lambda *_: None)
        assert time.monotonic() - t0 < 5
    assert res["failed"] == 1
    assert sum(c["status"] == 500 for c in server.calls) == 3  # the first try and 2 retries
    s = res["arms"]["pivot"]["single"]
    assert s["missing"] == 1 and s["n"] == n_turns() - 1 and s["by_turn"]["2"] == rating_for(ANSWERS["pivot"]["m1"][1])


def test_a_refused_key_stops_the_run_with_a_clear_error(tmp_path):
    with JudgeServer(fail_first=100, fail_status=401) as server:
        with pytest.raises(RuntimeError, match="refused the key"):
            judge_answers(judge(server, concurrency=1), QUESTIONS, answers(["pivot"]), str(tmp_path / "j"),
                          log=lambda *_: None)
    assert len(server.calls) == 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_budget_stops_calls_at_exactly_max_calls(tmp_path, concurrency):
    with JudgeServer(fail_first=1) as server:  # every prompt fails once: retries count against the budget
        res = judge_answers(judge(server, max_calls=9, concurrency=concurrency), QUESTIONS, answers(["pivot"]),
                            str(tmp_path / "j"), log=lambda *_: None)
    assert len(server.calls) == res["calls"] == 9
    judged = sum(c["status"] == 200 for c in server.calls)
    assert res["budget_hit"] and res["over_budget"] == n_turns() - judged
    assert res["arms"]["pivot"]["single"]["n"] == judged


def test_concurrency_overlaps_calls(tmp_path):
    with JudgeServer(service_delay_s=0.2) as server:
        t0 = time.monotonic()
        judge_answers(judge(server, concurrency=4), QUESTIONS, answers(["pivot"]), str(tmp_path / "j"),
                      log=lambda *_: None)
        took = time.monotonic() - t0
    assert server.max_in_flight > 1
    assert took < n_turns() * 0.2  # sequential calls would take at least this long


def test_rescoring_from_saved_judgements_makes_no_calls(tmp_path):
    store = str(tmp_path / "chat" / "judgements")
    cfg_kw = {"modes": ["single", "pairwise"], "samples": 2}
    with JudgeServer() as server:
        first = judge_answers(judge(server, **cfg_kw), QUESTIONS, answers(), store, log=lambda *_: None)
        url = server.url
    assert first["calls"] == 2 * 4 * n_turns()  # two samples: two calls per prompt
    assert set(server.seen.values()) == {2}
    files = sorted(Path(store).iterdir())
    assert files and all(f.suffix == ".jsonl" and ".tmp-" not in f.name for f in files)
    saved = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(saved) == first["calls"] and {"messages", "output", "judge_model"} <= set(saved[0])
    # the server is gone: any call would fail
    second = judge_answers(JudgeConfig(url=url, model="judge-x", backoff_s=0.01, timeout_s=1, bootstrap=200,
                                       **cfg_kw), QUESTIONS, answers(), store, log=lambda *_: None)
    assert second["calls"] == 0 and second["reused"] == first["calls"] and second["failed"] == 0
    assert second["arms"] == first["arms"]
    audit = [[(r["key"], r["parsed"]) for r in run["judgements"]] for run in (first, second)]
    assert audit[0] == audit[1] and len(audit[0]) == first["calls"]


def test_a_budget_cut_run_resumes_calling_only_what_is_missing(tmp_path):
    store = str(tmp_path / "j")
    with JudgeServer() as server:
        first = judge_answers(judge(server, max_calls=3), QUESTIONS, answers(["pivot"]), store, log=lambda *_: None)
        second = judge_answers(judge(server), QUESTIONS, answers(["pivot"]), store, log=lambda *_: None)
    assert first["calls"] == 3 and first["over_budget"] == n_turns() - 3
    assert second["calls"] == n_turns() - 3 and second["reused"] == 3 and not second["budget_hit"]
    assert set(server.seen.values()) == {1}  # no prompt was asked twice
    assert second["arms"]["pivot"]["single"]["mean"] == pytest.approx(expected_single("pivot")[0])


def test_the_key_comes_from_the_named_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FR_TEST_JUDGE_KEY", "sk-test-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with JudgeServer() as server:
        judge_answers(judge(server, api_key_env="FR_TEST_JUDGE_KEY"), QUESTIONS, answers(["pivot"]),
                      str(tmp_path / "a"), log=lambda *_: None)
        assert {c["auth"] for c in server.calls} == {"Bearer sk-test-123"}
        n = len(server.calls)
        for value in (None, ""):
            if value is None:
                monkeypatch.delenv("FR_TEST_JUDGE_KEY")
            else:
                monkeypatch.setenv("FR_TEST_JUDGE_KEY", value)
            with pytest.raises(ValueError, match="api_key_env.*FR_TEST_JUDGE_KEY"):
                judge_answers(judge(server, api_key_env="FR_TEST_JUDGE_KEY"), QUESTIONS, answers(["pivot"]),
                              str(tmp_path / "b"), log=lambda *_: None)
        assert len(server.calls) == n  # no call was made without the key


def test_a_missing_baseline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="eval.chat.judge.baseline"):
        judge_answers(JudgeConfig(url="http://127.0.0.1:9/v1", model="m", modes=["pairwise"], baseline="sft"),
                      QUESTIONS, answers(), str(tmp_path), log=lambda *_: None)


def test_judgements_made_before_a_fatal_error_are_saved(tmp_path):
    store = str(tmp_path / "j")
    with JudgeServer(fail_match="Double it.", fail_status=401) as server:  # a later prompt is refused
        with pytest.raises(RuntimeError, match="refused the key"):
            judge_answers(judge(server, concurrency=1), QUESTIONS, answers(["pivot"]), store, log=lambda *_: None)
        made = sum(c["status"] == 200 for c in server.calls)
    assert made > 0
    with JudgeServer() as server:
        res = judge_answers(judge(server), QUESTIONS, answers(["pivot"]), store, log=lambda *_: None)
    assert res["reused"] == made and res["calls"] == n_turns() - made


def test_two_baselines_judge_each_arm_against_both_and_their_pair_once(tmp_path):
    arms = answers()
    arms["sft"] = [{**a, "arm": "sft", "answers": [x + " indeed" for x in a["answers"]]} for a in arms["pivot"]]
    with JudgeServer() as server:
        res = judge_answers(judge(server, modes=["pairwise"], baseline=["pivot", "sft"]), QUESTIONS, arms,
                            str(tmp_path / "j"), log=lambda *_: None)
    got = {arm: sorted(r["pairwise"]) for arm, r in res["arms"].items()}
    assert got == {"merged": ["pivot", "sft"], "sft": ["pivot"]}  # sft vs pivot once, not pivot vs sft too
    # the stand-in prefers the longer answer: sft's answers are the pivot's plus a word
    assert res["arms"]["sft"]["pairwise"]["pivot"]["win_rate"] == 1.0
    assert res["calls"] == 3 * 2 * n_turns()  # 3 pairs × 2 orders × turns
    p = res["arms"]["merged"]["pairwise"]["sft"]
    assert p["baseline"] == "sft" and set(p["per_question"]) == {str(q["question_id"]) for q in QUESTIONS}
