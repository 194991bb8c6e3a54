"""The `sample` stage on a local Ray: prompts → each source → n responses per prompt (hf engine;
the vLLM sampler is tested in test_collect_vllm.py on that module's engine)."""

import json

import pyarrow.parquet as pq
import pytest
from helpers import tiny_reward_model

from fusion_ray import io
from fusion_ray.config import IMPLICIT_STAGES, parse_config
from fusion_ray.pipeline import parse_stages, pipeline_stages
from fusion_ray.sample import stage as sample
from fusion_ray.schema import PROMPTS_DIR

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
QUIET = lambda *_: None  # noqa: E731


def implicit_config(workdir, pivot, sources, prompts, reward, **implicit):
    return parse_config({
        "name": "implicit-test", "workdir": str(workdir), "method": "implicit",
        "pivot": {"name": "target", "path": str(pivot), "dtype": "float32"},
        "sources": [{"name": n, "path": str(p), "dtype": "float32", **extra} for n, (p, extra) in sources.items()],
        "implicit": {"prompts": prompts, "reward": {"path": str(reward)}, "engine": "hf", "samples": 2,
                     "shard_rows": 2, "batch_size": 2,
                     "num_cpus_per_actor": 0.5, "sampling": {"max_tokens": 5, "temperature": 1.0}, **implicit},
        "ray": {"num_cpus": 4},
    })


@pytest.fixture(scope="module")
def sampled(tiny_models, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "math.jsonl").write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"What is {i} + {i}?",
                                                        "answer": 2 * i}) + "\n" for i in range(4)))
    (tmp / "open.jsonl").write_text(json.dumps({"id": "o1", "prompt": "Say hello."}) + "\n")
    prompts = [{"path": str(tmp / "math.jsonl"), "domain": "arith", "verify": "math"},
               {"path": str(tmp / "open.jsonl"), "domain": "open", "samples": 3}]
    sources = {"qwen": (tiny_models("qwen2", "gpt2"), {}),
               "gpt": (tiny_models("gpt2", "gpt2"), {"sampling": {"temperature": 0.0, "max_tokens": 3}})}
    rm = tiny_reward_model(tiny_models("qwen2", "gpt2"), tmp / "rm")
    cfg = implicit_config(tmp / "w", tiny_models("qwen2", "deepseek"), sources, prompts, rm)
    return cfg, sample.run(cfg, log=QUIET)


def test_every_prompt_gets_its_samples_from_every_source_in_prompt_order(sampled):
    cfg, result = sampled
    assert result.status == "done" and set(result.parts) == {"qwen", "gpt"}
    for source in ("qwen", "gpt"):
        files = io.list_files(cfg.stage_dir("sample", source))
        assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet",
                                                        "part-00002.parquet"]
        rows = pq.read_table(cfg.stage_dir("sample", source)).to_pylist()
        assert [(r["prompt_id"], r["sample_index"]) for r in rows] == \
            [(f"m{i}", j) for i in range(4) for j in range(2)] + [("o1", 0), ("o1", 1), ("o1", 2)]
        assert {r["source"] for r in rows} == {source}
        manifest = io.read_manifest(cfg.stage_dir("sample", source))
        assert manifest["rows"] == {"in": 11, "out": 11}
        assert sum(manifest["extra"]["finish_reasons"].values()) == 11
        assert manifest["extra"]["tokens"] == sum(r["tokens"] for r in rows)


def test_each_source_samples_with_its_own_settings(sampled):
    cfg, _ = sampled
    greedy = pq.read_table(cfg.stage_dir("sample", "gpt")).to_pylist()
    assert all(r["tokens"] <= 3 for r in greedy)  # its own max_tokens
    for pid in ("m0", "o1"):  # greedy: every draw of a prompt is the same
        assert len({r["response"] for r in greedy if r["prompt_id"] == pid}) == 1
    drawn = pq.read_table(cfg.stage_dir("sample", "qwen")).to_pylist()
    assert all(r["tokens"] <= 5 for r in drawn)
    assert all(r["finish_reason"] in ("stop", "length") for r in drawn + greedy)


def test_prompts_are_checked_into_shards_with_a_manifest(sampled):
    cfg, _ = sampled
    prompts = cfg.stage_dir("sample", PROMPTS_DIR)
    manifest = io.read_manifest(prompts)
    assert manifest["rows"] == {"in": 5, "out": 5} and manifest["extra"]["per_domain"] == {"arith": 4, "open": 1}
    rows = pq.read_table(prompts).to_pylist()
    assert [r["answer"] for r in rows] == ["0", "2", "4", "6", None]


def test_a_rerun_skips_and_a_changed_setting_resamples_only_that_source(sampled):
    cfg, _ = sampled
    again = sample.run(cfg, log=QUIET)
    assert {n: p.status for n, p in again.parts.items()} == {"qwen": "skipped", "gpt": "skipped"}
    data = cfg.to_dict()
    data["sources"][0]["sampling"] = {"temperature": 0.5, "max_tokens": 4}
    changed = sample.run(parse_config(data), log=QUIET)
    assert {n: p.status for n, p in changed.parts.items()} == {"qwen": "done", "gpt": "skipped"}


def test_the_implicit_method_has_its_own_stage_list(sampled):
    cfg, _ = sampled
    assert pipeline_stages(cfg) == parse_stages(None, cfg) == list(IMPLICIT_STAGES)
    assert parse_stages("reward,sample", cfg) == ["sample", "reward"]
    with pytest.raises(ValueError, match="not of method implicit"):
        parse_stages("collect", cfg)


def test_the_implicit_eval_asks_for_implicit_heldout_prompts_not_data_heldout(sampled, tmp_path):
    from fusion_ray.config import PromptCorpus
    from fusion_ray.pipeline import check_stages

    cfg, _ = sampled
    assert not cfg.data.heldout and not cfg.implicit.heldout
    with pytest.raises(ValueError, match=r"implicit.heldout: the eval stage needs held-out prompts") as e:
        check_stages(cfg, list(IMPLICIT_STAGES))
    assert "data.heldout" not in str(e.value)
    with_heldout = cfg.model_copy(deep=True)
    with_heldout.implicit.heldout = [PromptCorpus(path=cfg.implicit.prompts[0].path, verify="math")]
    check_stages(with_heldout, list(IMPLICIT_STAGES))  # no data.heldout needed


@pytest.mark.timeout(600)  # run alone, it also builds the module's samples
def test_eval_answers_the_heldout_prompts_with_every_arm_and_reports_accuracy_and_win_rate(sampled, tmp_path):
    """Implicit fusion's eval stage: the arms answer greedily (the sample stage on their own config,
    run by the pipeline before eval), the verifiers and the reward model score the answers. Arm
    `sft` here is a copy of the pivot, so greedy answers, accuracy and rewards are the pivot's and
    the win rate is exactly one half (the single-source arm `only-qwen` too)."""
    import shutil

    from fusion_ray.pipeline import run_stage

    cfg, _ = sampled
    from fusion_ray.config import PromptCorpus

    (tmp_path / "times.jsonl").write_text("".join(
        json.dumps({"id": f"h{i}", "prompt": f"What is {i} times 3?", "answer": 3 * i}) + "\n" for i in range(3)))
    (tmp_path / "open.jsonl").write_text(json.dumps({"id": "ho", "prompt": "Greet me."}) + "\n")
    cfg = cfg.model_copy(deep=True)
    cfg.workdir = str(tmp_path / "w")
    cfg.implicit.heldout = [PromptCorpus(path=str(tmp_path / "times.jsonl"), domain="times", verify="math"),
                            PromptCorpus(path=str(tmp_path / "open.jsonl"), domain="open")]
    cfg.implicit.single_source_arms = ["qwen"]
    sft, alone = cfg.stage_dir("sft"), f"{cfg.stage_dir('dpo')}-only-qwen"  # the single-source arm's SFT+DPO
    for arm_dir in (sft, alone):
        shutil.copytree(cfg.pivot.path, arm_dir)
        io.write_json_atomic(f"{arm_dir}/_manifest.json", {"stage": "x", "fingerprint": "x"})
    result = run_stage("eval", cfg, log=QUIET)
    assert result.status == "done"
    report = json.loads(open(f"{cfg.stage_dir('eval')}/report.json").read())
    assert sorted(report["models"]) == ["only-qwen", "pivot", "sft"] and report["labels"]["sft"] == "SFT"
    assert report["labels"]["only-qwen"] == "qwen only" and report["best_single"] == "only-qwen"
    assert report["win_rate_vs_pivot"]["only-qwen"] == 0.5  # the pivot's weights again
    del report["win_rate_vs_pivot"]["only-qwen"]
    rows = pq.read_table(f"{cfg.workdir}/_eval/rewards").to_pylist()
    assert sorted((r["source"], r["prompt_id"]) for r in rows) == sorted(
        (arm, p) for arm in ("pivot", "sft", "only-qwen") for p in ("h0", "h1", "h2", "ho"))
    answers = {(r["source"], r["prompt_id"]): r["response"] for r in rows}
    assert all(answers[("pivot", p)] == answers[("sft", p)] for p in ("h0", "h1", "h2", "ho"))  # greedy, same weights
    for arm in ("pivot", "sft"):
        mine = [r for r in rows if r["source"] == arm and r["domain"] == "times"]
        assert report["accuracy"][arm]["times"] == sum(bool(r["correct"]) for r in mine) / 3
    assert report["win_rate_vs_pivot"] == {"sft": 0.5} and report["by"] == "reward_model"
    assert report["mean_reward"]["pivot"] == report["mean_reward"]["sft"]
    assert "| SFT |" in open(f"{cfg.stage_dir('eval')}/report.md").read()
    assert run_stage("eval", cfg, log=QUIET).status == "skipped"
    from fusion_ray.evaluate import stage as evaluate  # the stage alone reads answers; it never makes them

    with pytest.raises(ValueError, match="answers are not scored yet"):
        evaluate.run(cfg.model_copy(update={"workdir": str(tmp_path / "fresh")}), log=QUIET)
