"""The `pairs` stage on hand-made reward shards: SFT rows and DPO pairs per shard, with the prompt's
chat, counts in the manifest (no Ray: the stage is driver-side)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_ray import io
from fusion_ray.config import parse_config
from fusion_ray.pairs import stage as pairs_stage
from fusion_ray.schema import PROMPTS, PROMPTS_DIR, REWARDS

QUIET = lambda *_: None  # noqa: E731


def reward_row(pid, domain, source, i, response, reward, correct):
    verify = "math" if correct is not None else "none"
    return {"prompt_id": pid, "domain": domain, "verify": verify, "verifiable": correct is not None,
            "source": source, "sample_index": i, "response": response, "tokens": 3, "finish_reason": "stop",
            "reward": reward, "correct": correct, "verdict": "passed" if correct else ("" if correct is None else
                                                                                    "wrong_answer")}


SHARDS = {
    "part-00000.parquet": [  # math prompt m1; open prompt o1
        reward_row("m1", "math", "a", 0, "The answer is 5.", 0.2, True),
        reward_row("m1", "math", "a", 1, "The answer is 6.", 0.9, False),  # higher reward, but wrong
        reward_row("m1", "math", "b", 0, "The answer is 5!", 0.5, True),
        reward_row("m1", "math", "b", 1, "The answer is 4.", 0.1, False),
        reward_row("o1", "open", "a", 0, "hi", 0.30, None),
        reward_row("o1", "open", "a", 1, "hello", 0.35, None),  # gap 0.05: in [0.01, 0.1]
        reward_row("o1", "open", "b", 0, "hey", 0.90, None),
        reward_row("o1", "open", "b", 1, "yo", 0.20, None),  # gap 0.7: above the range
    ],
    "part-00001.parquet": [  # math prompt m2: nobody right
        reward_row("m2", "math", "a", 0, "The answer is 1.", 0.4, False),
        reward_row("m2", "math", "b", 0, "The answer is 2.", 0.6, False),
    ],
}


def setup_workdir(tmp_path, dpo_fraction, single_source_arms=()):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "x", "prompt": "q", "answer": "1"}) + "\n")
    cfg = parse_config({"name": "pairs-test", "workdir": str(tmp_path / "w"), "method": "implicit",
                        "pivot": {"name": "t", "path": "org/target"},
                        "sources": [{"name": "a", "path": "org/a"}, {"name": "b", "path": "org/b"}],
                        "implicit": {"prompts": [{"path": str(tmp_path / "p.jsonl"), "verify": "math"}],
                                     "pairs": {"dpo_fraction": dpo_fraction},
                                     "single_source_arms": list(single_source_arms)}})
    prompts = io.begin(f"{cfg.stage_dir('sample')}/{PROMPTS_DIR}", "handmade")
    rewards = io.begin(cfg.stage_dir("reward"), "handmade")
    for name, rows in SHARDS.items():
        pids = sorted({r["prompt_id"] for r in rows})
        prompts.write_table(name, pa.Table.from_pylist(
            [{"prompt_id": p, "domain": "x", "verify": "none", "samples": 2,
              "messages": json.dumps([{"role": "user", "content": f"question {p}"}])} for p in pids], schema=PROMPTS))
        rewards.write_table(name, pa.Table.from_pylist(rows, schema=REWARDS))
    prompts.commit(io.Manifest(stage="sample", fingerprint="handmade", config_hash="-"))
    rewards.commit(io.Manifest(stage="reward", fingerprint="handmade", config_hash="-", rows={"out": 10}))
    return cfg


def test_all_sft_picks_the_best_correct_response_per_prompt_with_its_chat(tmp_path):
    cfg = setup_workdir(tmp_path, dpo_fraction=0.0)
    result = pairs_stage.run(cfg, log=QUIET)
    sft = pq.read_table(cfg.stage_dir("pairs") + "/sft").to_pylist()
    assert [(r["prompt_id"], r["source"], r["sample_index"]) for r in sft] == [("m1", "b", 0), ("o1", "b", 0)]
    assert json.loads(sft[0]["messages"]) == [{"role": "user", "content": "question m1"}]
    assert pq.read_table(cfg.stage_dir("pairs") + "/dpo").num_rows == 0
    total = io.read_manifest(cfg.stage_dir("pairs"))["extra"]["counts"]["total"]
    assert (total["prompts"], total["sft_rows"], total["drops"]["sft_no_correct_response"]) == (3, 2, 1)
    assert result.figures["rows"] == {"in": 10, "sft": 2, "dpo": 0}
    assert pairs_stage.run(cfg, log=QUIET).status == "skipped"


def test_all_dpo_pairs_one_source_correct_over_wrong_and_keeps_open_gaps_in_range(tmp_path):
    cfg = setup_workdir(tmp_path, dpo_fraction=1.0)
    pairs_stage.run(cfg, log=QUIET)
    dpo = pq.read_table(cfg.stage_dir("pairs") + "/dpo").to_pylist()
    got = [(r["prompt_id"], r["source"], r["chosen"], r["rejected"]) for r in dpo]
    # m1: both sources have a correct and a wrong answer; one pair per prompt, the source whose chosen
    # has the highest reward (b: 0.5 > a: 0.2). o1: a's gap 0.05 is in range, b's 0.7 is not.
    assert got == [("m1", "b", "The answer is 5!", "The answer is 4."), ("o1", "a", "hello", "hi")]
    assert all(json.loads(r["messages"])[0]["content"] == f"question {r['prompt_id']}" for r in dpo)
    counts = io.read_manifest(cfg.stage_dir("pairs"))["extra"]["counts"]
    assert counts["total"]["dpo_pairs"] == 2
    assert counts["by_source"]["b"]["drops"]["dpo_gap_above_range"] == 1
    assert counts["total"]["drops"]["dpo_single_sample"] == 2  # m2: one sample from each source


def test_a_changed_gap_range_pairs_again(tmp_path):
    cfg = setup_workdir(tmp_path, dpo_fraction=1.0)
    pairs_stage.run(cfg, log=QUIET)
    data = cfg.to_dict()
    data["implicit"]["pairs"]["max_gap"] = 1.0
    wider = parse_config(data)
    assert pairs_stage.run(wider, log=QUIET).status == "done"
    dpo = pq.read_table(wider.stage_dir("pairs") + "/dpo").to_pylist()
    assert [(r["prompt_id"], r["source"]) for r in dpo] == [("m1", "b"), ("o1", "b")]  # b's chosen 0.9 now counts


def test_bad_gap_range_is_refused_by_the_config(tmp_path):
    (tmp_path / "p.jsonl").write_text("{}\n")
    with pytest.raises(Exception, match="min_gap"):
        parse_config({"name": "x", "workdir": str(tmp_path), "method": "implicit",
                      "pivot": {"name": "t", "path": "org/t"}, "sources": [{"name": "a", "path": "org/a"}],
                      "implicit": {"prompts": [{"path": str(tmp_path / "p.jsonl"), "verify": "math"}],
                                   "pairs": {"min_gap": 0.5, "max_gap": 0.1}}})


@pytest.mark.parametrize("dpo_fraction", [0.0, 1.0])
def test_single_source_arms_pair_each_sources_samples_alone(tmp_path, dpo_fraction):
    cfg = setup_workdir(tmp_path, dpo_fraction, single_source_arms=["a", "b"])
    result = pairs_stage.run(cfg, log=QUIET)
    read = lambda arm, part: [(r["prompt_id"], r["source"], r.get("sample_index", r.get("chosen")))  # noqa: E731
                              for r in pq.read_table(f"{cfg.stage_dir('pairs')}/{arm}{part}").to_pylist()]
    if dpo_fraction == 0.0:
        # a alone: its only correct m1 answer (reward 0.2) and its best o1 answer; b alone: what fusing picked
        assert read("", "sft") == [("m1", "b", 0), ("o1", "b", 0)]
        assert read("only-a/", "sft") == [("m1", "a", 0), ("o1", "a", 1)]
        assert read("only-b/", "sft") == [("m1", "b", 0), ("o1", "b", 0)]
    else:
        assert read("only-a/", "dpo") == [("m1", "a", "The answer is 5."), ("o1", "a", "hello")]
        assert read("only-b/", "dpo") == [("m1", "b", "The answer is 5!")]  # o1: b's gap 0.7 is out of range
    arms = io.read_manifest(cfg.stage_dir("pairs"))["extra"]["arms"]
    assert set(arms) == {"only-a", "only-b"} and set(arms["only-a"]["by_source"]) == {"a"}
    assert result.figures["rows"]["in"] == 10
    assert pairs_stage.run(cfg, log=QUIET).status == "skipped"
    fewer = parse_config({**cfg.to_dict(), "implicit": {**cfg.to_dict()["implicit"], "single_source_arms": ["a"]}})
    assert pairs_stage.run(fewer, log=QUIET).status == "done"  # the arms decide what is written


def test_single_source_arms_must_name_sources(tmp_path):
    with pytest.raises(Exception, match=r"single_source_arms: c not among the sources \(a, b\)"):
        setup_workdir(tmp_path, 0.5, single_source_arms=["a", "c"])
