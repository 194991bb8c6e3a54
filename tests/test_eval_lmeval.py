"""`eval.lm_eval`: lm-evaluation-harness on a local, offline task (tests/data/lmeval).

The model-dir path runs the multiple-choice variant through lm-eval's `hf` model on a Ray task and
checks its accuracies against log-likelihoods computed here with transformers; settings errors
fail in the driver before any model loads. (The endpoint path is in tests/test_serve_live.py,
on the served tiny model.)
"""

import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from fusion_ray.config import LmEvalConfig  # noqa: E402
from fusion_ray.evaluate import lmeval  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lmeval"


def spec(**fields) -> LmEvalConfig:
    return LmEvalConfig.model_validate({"include_path": str(TASKS), "arms": ["pivot"], **fields})


def mc_reference(model_dir: Path) -> tuple[float, float, int]:
    """(acc, acc_norm, items) of the multiple-choice task, by hand: each choice's summed log-prob
    after "Question: …\\nAnswer:" (its tokens are those of context + " " + choice past the
    context's own), the argmax (acc) and the argmax per character of the choice (acc_norm)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (TASKS / "short_answer.jsonl").read_text().splitlines()]
    acc = acc_norm = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        lls = []
        for choice in row["choices"]:
            ids = tok(context + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        acc += max(range(4), key=lambda i: lls[i]) == row["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(row["choices"][i])) == row["label"]
    return acc / len(rows), acc_norm / len(rows), len(rows)


@pytest.mark.timeout(240)
def test_a_local_multiple_choice_task_on_a_model_dir_matches_log_likelihoods_by_hand(tiny_models, ray_local):
    model = tiny_models("qwen2", "gpt2")
    lines = []
    out = lmeval.run_lm_eval(spec(tasks=["fr_short_answer_mc"], apply_chat_template=False, batch_size=4),
                             {"pivot": str(model), "merged": "/nonexistent"}, log=lines.append)
    acc, acc_norm, n = mc_reference(model)
    got = out["results"]["pivot"]["fr_short_answer_mc"]
    assert set(out["results"]) == {"pivot"}  # only the chosen arm ran
    assert got["n"] == n == 20
    assert got["acc"] == pytest.approx(acc, abs=1e-9) and got["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert got["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)), rel=1e-6)
    assert 0 < acc < 1 or 0 < acc_norm < 1  # a reference that can tell a wrong argmax from a right one
    items = out["samples"]["pivot"]["fr_short_answer_mc"]
    assert sorted(s["doc_id"] for s in items) == list(range(n))
    assert sum(s["acc"] for s in items) == round(acc * n)
    assert out["lm_eval_version"] == "0.4.13" and out["settings"]["offline"] is True
    assert any("fr_short_answer_mc" in line and "pivot" in line for line in lines)


def test_an_unknown_task_is_named_with_the_include_path_before_any_model_loads():
    # the arm's dir does not exist: an attempt to load it would fail differently
    with pytest.raises(lmeval.LmEvalError) as err:
        lmeval.run_lm_eval(spec(tasks=["fr_short_answer", "no_such_task"]), {"pivot": "/nonexistent"})
    assert "no_such_task" in str(err.value) and str(TASKS) in str(err.value)
    assert "fr_short_answer," not in str(err.value)  # the known one is not blamed


def test_a_missing_include_path_is_named(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(lmeval.LmEvalError, match=r"eval\.lm_eval\.include_path: .*gone"):
        lmeval.run_lm_eval(spec(tasks=["fr_short_answer"], include_path=str(gone)), {"pivot": "/nonexistent"})
    (tmp_path / "file.yaml").write_text("task: x\n")
    with pytest.raises(lmeval.LmEvalError, match="not a directory"):
        lmeval.run_lm_eval(spec(tasks=["x"], include_path=str(tmp_path / "file.yaml")), {"pivot": "/x"})


def test_the_config_refuses_a_missing_include_path_at_load(tmp_path):
    from fusion_ray.config import CHECK_FILES

    with pytest.raises(ValueError, match="include_path"):
        LmEvalConfig.model_validate({"tasks": ["t"], "arms": ["pivot"], "include_path": str(tmp_path / "gone")},
                                    context={CHECK_FILES: True})


def test_an_unknown_arm_and_an_unset_key_are_named():
    with pytest.raises(lmeval.LmEvalError, match=r"no arm 'mergd'.*merged, pivot"):
        lmeval.run_lm_eval(spec(tasks=["fr_short_answer"], arms=["mergd"]), {"pivot": "/x", "merged": "/y"})
    endpoint = {"url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "FUSION_RAY_TEST_UNSET_KEY_ENV"}
    with pytest.raises(lmeval.LmEvalError, match="FUSION_RAY_TEST_UNSET_KEY_ENV is not set"):
        lmeval.run_lm_eval(spec(tasks=["fr_short_answer"], arms=[], endpoint=endpoint), {})


def test_arm_prefixes_pick_every_arm_they_start():
    arms = {"pivot": "/p", "fused:a+b": "/f1", "fused:a+c": "/f2", "source:a": "/s"}
    assert lmeval.pick_arms(spec(tasks=["t"], arms=["fused:", "pivot"]), arms) == {
        "fused:a+b": "/f1", "fused:a+c": "/f2", "pivot": "/p"}


def test_metric_names_drop_a_lone_filter_and_keep_several():
    results = {"t": {"alias": "t", "exact_match,first_word": 0.5, "exact_match_stderr,first_word": 0.1,
                     "acc,none": 1.0, "acc_stderr,none": "N/A"},
               "u": {"exact_match,strict": 0.25, "exact_match_stderr,strict": 0.05,
                     "exact_match,flexible": 0.75, "exact_match_stderr,flexible": 0.07}}
    got = lmeval.metrics_of(results, {"t": {"original": 9, "effective": 8}})
    assert got["t"] == {"exact_match": 0.5, "exact_match_stderr": 0.1, "acc": 1.0, "acc_stderr": None, "n": 8}
    assert got["u"] == {"exact_match,strict": 0.25, "exact_match,strict_stderr": 0.05,
                        "exact_match,flexible": 0.75, "exact_match,flexible_stderr": 0.07}
