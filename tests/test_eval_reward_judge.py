"""A local reward model as the chat judge (`eval.chat.judge.reward_model`), pairwise.

No Ray (the judge scores in this process when Ray is not up). The model is a randomly initialised
one-output Qwen2 classifier with the demo's cut GPT-2 tokenizer: what it prefers is arbitrary, so
the expected verdicts come from its own scores of each conversation (through `RewardScorer`, whose
scores are tested on their own in test_reward_stage) and this test's rule: the higher score wins.
"""

from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError

from fusion_ray.config import JudgeConfig
from fusion_ray.config.implicit import RewardModelConfig
from fusion_ray.evaluate.judging import judge_answers, parse_verdict

QUESTIONS = [{"question_id": f"q{i}", "category": "open", "turns": [f"What is thing {i}?"]} for i in range(6)]
REPLIES = {
    "pivot": ["a thing", "thing thing thing", "an object of some kind", "no idea", "a word", "same answer"],
    "sft": ["a thing that is", "a long and careful answer about it", "object", "it is a noun", "word", "same answer"],
    "dpo": ["thing", "an answer", "an object, made of parts", "a noun", "a word of English", "same answer"],
}


def answers(arms=("pivot", "sft", "dpo")) -> dict[str, list[dict]]:
    return {arm: [{"question_id": q["question_id"], "answers": [REPLIES[arm][i]]} for i, q in enumerate(QUESTIONS)]
            for arm in arms}


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    import torch

    from fusion_ray.demo.assets import TinyModel
    from fusion_ray.demo.build_implicit import make_reward_model
    from fusion_ray.demo.tokenizers import build_tokenizer

    out = tmp_path_factory.mktemp("rm") / "judge"
    tok = build_tokenizer("gpt2", 400, out)
    torch.manual_seed(3)
    make_reward_model(TinyModel("j", "qwen2", "gpt2", 400, (("chat", 1.0),), steps=1), tok).save_pretrained(
        out, safe_serialization=True)
    return out


def scores(path, replies: list[str], question: str) -> list[float]:
    from fusion_ray.engines.reward_model import RewardScorer

    scorer = RewardScorer(str(path), dtype="float32", device="cpu")
    return scorer.score([[{"role": "user", "content": question}, {"role": "assistant", "content": r}]
                         for r in replies])


def rm_judge(path, **kw) -> JudgeConfig:
    return JudgeConfig(reward_model=RewardModelConfig(path=str(path), dtype="float32"), modes=["pairwise"],
                       bootstrap=200, **kw)


def test_a_reward_model_judges_pairwise_by_its_scores_and_reruns_from_saved(reward_dir, tmp_path):
    store = str(tmp_path / "judgements")
    res = judge_answers(rm_judge(reward_dir, baseline=["pivot", "sft"]), QUESTIONS, answers(), store,
                        log=lambda *_: None)
    assert sorted(res["arms"]["dpo"]["pairwise"]) == ["pivot", "sft"] and list(res["arms"]["sft"]["pairwise"]) == ["pivot"]
    for arm, base in (("dpo", "pivot"), ("dpo", "sft"), ("sft", "pivot")):
        prefs = []
        for i, q in enumerate(QUESTIONS):
            if REPLIES[arm][i] == REPLIES[base][i]:  # one conversation, one score
                prefs.append(0.5)
                continue
            a, b = scores(reward_dir, [REPLIES[arm][i], REPLIES[base][i]], q["turns"][0])
            assert abs(a - b) > 1e-4  # far above the float noise of batching
            prefs.append(1.0 if a > b else 0.0)
        p = res["arms"][arm]["pairwise"][base]
        assert p["win_rate"] == pytest.approx(sum(prefs) / len(prefs)), (arm, base)
        assert p["inconsistent"] == 0  # a score does not depend on the position
        assert p["ties"] == prefs.count(0.5) >= 1  # the same answer twice is a tie
        assert p["lc_win_rate"] is not None and p["ci"][0] <= p["win_rate"] <= p["ci"][1]
    rec = next(r for r in res["judgements"] if r["arm"] == "dpo" and r["baseline"] == "sft" and r["order"] == "BA")
    assert rec["parsed"] == parse_verdict(rec["output"]) and "reward A" in rec["output"]
    assert rec["judge_model"] == f"reward-model:{reward_dir}"
    # a rerun re-scores from the saved outputs: the model is not needed any more
    moved = tmp_path / "gone"
    shutil.move(reward_dir, moved)
    try:
        again = judge_answers(rm_judge(reward_dir, baseline=["pivot", "sft"]), QUESTIONS, answers(), store,
                              log=lambda *_: None)
    finally:
        shutil.move(moved, reward_dir)
    assert again["reused"] == len({r["key"] for r in res["judgements"]}) and again["arms"] == res["arms"]


def test_judge_config_names_one_judge_and_what_a_reward_model_can_do(reward_dir):
    rm = RewardModelConfig(path=str(reward_dir))
    with pytest.raises(ValidationError, match="either `url` and `model`"):
        JudgeConfig(url="http://127.0.0.1:9/v1", model="m", reward_model=rm, modes=["pairwise"])
    with pytest.raises(ValidationError, match="either `url` and `model`"):
        JudgeConfig(modes=["pairwise"])
    with pytest.raises(ValidationError, match="needs the model name"):
        JudgeConfig(url="http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError, match="pairwise.*single"):
        JudgeConfig(reward_model=rm, modes=["single", "pairwise"])
    with pytest.raises(ValidationError, match="named twice"):
        JudgeConfig(reward_model=rm, modes=["pairwise"], baseline=["pivot", "pivot"])
    assert JudgeConfig(reward_model=rm, modes=["pairwise"]).baselines == ["pivot"]
