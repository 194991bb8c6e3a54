"""The `reward` stage on a local Ray, on hand-made sample shards: verifiers row by row (hostile code
contained, the stage carrying on), reward-model scores against a plain transformers forward."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import tiny_reward_model

from fusion_ray import io
from fusion_ray.config import parse_config
from fusion_ray.reward import stage as reward
from fusion_ray.schema import PROMPTS, PROMPTS_DIR, SAMPLES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
QUIET = lambda *_: None  # noqa: E731

GOOD_CODE = "```python\ndef add(a, b):\n    return a + b\n```"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
SOCKET = "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b\n```"
PROMPT_ROWS = [
    {"prompt_id": "m1", "domain": "math", "verify": "math", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
     "answer": "5", "tests": None, "samples": 2},
    {"prompt_id": "c1", "domain": "code", "verify": "code", "messages": [{"role": "user", "content": "Write add."}],
     "answer": None, "tests": "assert add(2, 3) == 5", "samples": 2},
    {"prompt_id": "o1", "domain": "open", "verify": "none", "messages": [{"role": "user", "content": "Greet me."}],
     "answer": None, "tests": None, "samples": 2},
]
SAMPLE_ROWS = {  # (prompt, index, response, finish_reason) → expected (correct, verdict)
    "a": [("m1", 0, "2 + 3 = 5. The answer is 5.", "stop", True, "passed"),
          ("m1", 1, "2 + 3 = 6. The answer is 6.", "stop", False, "wrong_answer"),
          ("c1", 0, GOOD_CODE, "stop", True, "passed"),
          ("c1", 1, LOOP, "stop", False, "timeout"),
          ("o1", 0, "Hello there, friend!", "stop", None, ""),
          ("o1", 1, "zzz", "length", None, "")],
    "b": [("m1", 0, "I do not know.", "stop", False, "no_answer"),
          ("m1", 1, "", "prompt_too_long", None, None),
          ("c1", 0, SOCKET, "stop", False, "error"),  # no network in the sandbox: it raises before the tests
          ("c1", 1, "```python\nx = bytearray(10**10)\n```", "stop", False, "memory"),
          ("o1", 0, "Good day to you.", "stop", None, ""),
          ("o1", 1, "Hi.", "stop", None, "")],
}


def finished(directory: str, name: str, table: pa.Table) -> None:
    out = io.begin(directory, "handmade")
    out.write_table(name, table)
    out.commit(io.Manifest(stage="sample", fingerprint="handmade", config_hash="-"))


@pytest.fixture(scope="module")
def scored(tiny_models, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("reward")
    base = tiny_models("qwen2", "gpt2")
    rm = tiny_reward_model(base, tmp / "rm")
    (tmp / "p.jsonl").write_text(json.dumps({"id": "x", "prompt": "q", "answer": "1"}) + "\n")
    cfg = parse_config({
        "name": "reward-test", "workdir": str(tmp / "w"), "method": "implicit",
        "pivot": {"name": "target", "path": str(base)},
        "sources": [{"name": "a", "path": str(base)}, {"name": "b", "path": str(base)}],
        "implicit": {"prompts": [{"path": str(tmp / "p.jsonl"), "verify": "math"}],
                     "reward": {"path": str(rm), "dtype": "float32", "batch_size": 4, "num_cpus_per_actor": 0.5},
                     "sandbox": {"cpu_seconds": 2, "wall_seconds": 4, "memory_mb": 256}},
        "ray": {"num_cpus": 4},
    })
    prompts = [{**r, "messages": json.dumps(r["messages"])} for r in PROMPT_ROWS]
    finished(f"{cfg.stage_dir('sample')}/{PROMPTS_DIR}", "part-00000.parquet",
             pa.Table.from_pylist(prompts, schema=PROMPTS))
    for src, rows in SAMPLE_ROWS.items():
        samples = [{"prompt_id": p, "source": src, "sample_index": i, "response": text, "tokens": len(text.split()),
                    "finish_reason": why} for p, i, text, why, *_ in rows]
        finished(cfg.stage_dir("sample", src), "part-00000.parquet", pa.Table.from_pylist(samples, schema=SAMPLES))
    return cfg, rm, reward.run(cfg, log=QUIET)


def test_verifiers_judge_each_response_and_hostile_code_only_fails_its_sample(scored):
    cfg, _, result = scored
    assert result.status == "done"
    rows = pq.read_table(cfg.stage_dir("reward")).to_pylist()
    got = [(r["source"], r["prompt_id"], r["sample_index"], r["correct"], r["verdict"]) for r in rows]
    want = [(src, p, i, ok, verdict) for src, items in SAMPLE_ROWS.items()
            for p, i, _, why, ok, verdict in items if why != "prompt_too_long"]
    assert got == want
    assert [r["verifiable"] for r in rows] == [r["prompt_id"] != "o1" for r in rows]


def test_rewards_are_the_reward_models_scores_of_the_whole_chat(scored):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, rm, _ = scored
    tok = AutoTokenizer.from_pretrained(rm)
    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    prompts = {r["prompt_id"]: r["messages"] for r in PROMPT_ROWS}
    for r in pq.read_table(cfg.stage_dir("reward")).to_pylist():
        chat = prompts[r["prompt_id"]] + [{"role": "assistant", "content": r["response"]}]
        ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():  # one chat, no padding: the plain forward
            logits = model(**ids).logits
        assert r["reward"] == pytest.approx(float(logits.reshape(-1)[0]), abs=1e-4), r["response"]


def test_the_manifest_counts_per_source_and_the_unscored_and_a_rerun_skips(scored):
    cfg, _, result = scored
    manifest = io.read_manifest(cfg.stage_dir("reward"))
    assert manifest["rows"] == {"in": 12, "out": 11} and manifest["extra"]["unscored"] == {"prompt_too_long": 1}
    a, b = manifest["extra"]["per_source"]["a"], manifest["extra"]["per_source"]["b"]
    assert (a["verifiable"], a["correct"], b["verifiable"], b["correct"]) == (4, 2, 3, 0)
    assert b["verdicts"] == {"no_answer": 1, "error": 1, "memory": 1}
    assert reward.run(cfg, log=QUIET).status == "skipped"
