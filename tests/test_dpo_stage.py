"""The `dpo` stage on a local Ray: the reference pass scores hand-made pairs with the SFT model (checked
against a plain transformers forward), then Ray Train (DDP on gloo) trains from the SFT weights with
sigmoid DPO: the first step's loss is log 2 (policy = reference) and the trained policy prefers the
chosen responses more than the reference did."""

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_ray import io
from fusion_ray.config import parse_config
from fusion_ray.dpo import stage as dpo
from fusion_ray.pairs.stage import DPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731


def pair(i):
    return {"prompt_id": f"p{i}", "domain": "arith", "verifiable": True, "source": "a",
            "messages": json.dumps([{"role": "user", "content": f"What is {i} + 1?"}]),
            "chosen": f"{i} + 1 = {i + 1}. The answer is {i + 1}.", "rejected": f"I think it is {i + 7}.",
            "chosen_reward": 1.0, "rejected_reward": 0.0, "chosen_index": 0, "rejected_index": 1}


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("dpo")
    target = tiny_models("qwen2", "gpt2")
    (tmp / "p.jsonl").write_text(json.dumps({"id": "x", "prompt": "q", "answer": "1"}) + "\n")
    cfg = parse_config({
        "name": "dpo-test", "workdir": str(tmp / "w"), "method": "implicit",
        "pivot": {"name": "target", "path": str(target), "dtype": "float32"},
        "sources": [{"name": "a", "path": str(target)}, {"name": "b", "path": str(target)}],
        "data": {"max_length": 64},
        "implicit": {"prompts": [{"path": str(tmp / "p.jsonl"), "verify": "math"}], "engine": "hf",
                     "single_source_arms": ["b"],
                     "num_cpus_per_actor": 0.5, "dpo": {"loss": "sigmoid", "beta": 0.5, "lr": 3e-3, "max_steps": 4}},
        "train": {"strategy": "ddp", "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4,
                  "micro_batch_size": 4, "max_steps": 99, "bf16": False, "checkpoint_every": 4, "report_every": 1,
                  "warmup_ratio": 0.0},
        "ray": {"num_cpus": 4},
    })
    pairs = io.begin(cfg.stage_dir("pairs"), "handmade")
    pairs.write_table("dpo/part-00000.parquet", pa.Table.from_pylist([pair(i) for i in range(8)], schema=DPO))
    pairs.write_table("only-b/dpo/part-00000.parquet",
                      pa.Table.from_pylist([{**pair(i), "source": "b"} for i in range(4)], schema=DPO))
    pairs.commit(io.Manifest(stage="pairs", fingerprint="handmade", config_hash="-", rows={"dpo": 8}))
    shutil.copytree(target, cfg.stage_dir("sft"))  # the SFT model: here the target itself
    io.write_json_atomic(f"{cfg.stage_dir('sft')}/_manifest.json", {"stage": "sft", "fingerprint": "handmade-sft"})
    perturbed_copy(target, f"{cfg.stage_dir('sft')}-only-b")  # the single-source arm's own SFT model
    io.write_json_atomic(f"{cfg.stage_dir('sft')}-only-b/_manifest.json", {"stage": "sft", "fingerprint": "b-sft"})
    return cfg, target, dpo.run(cfg, log=QUIET)


def perturbed_copy(model_dir, out):
    """The model with noise on every weight (its tokenizer files too): another SFT model to score with."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)


def response_logp(model, tok, chat, response):
    """Σ log p(response tokens | the rest), a plain unbatched forward (tokens that start in the reply)."""
    import torch

    text = tok.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
    start = len(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    end = len(tok.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False))
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([enc["input_ids"]])
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(float(lp[t - 1, ids[0, t]]) for t, (s, _) in enumerate(enc["offset_mapping"]) if t and start <= s < end)


def test_the_reference_pass_gives_each_responses_log_prob_under_the_sft_model(trained):
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray.tokenizer import from_dir

    cfg, target, _ = trained
    tok = from_dir(target)  # the target's tokenizer as every stage loads it
    model = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft"), dtype=torch.float32).eval()
    rows = pq.read_table(dpo.data_dir(cfg)).to_pylist()
    assert [r["sample_id"] for r in rows] == [f"p{i}/a" for i in range(8)]
    for i, r in enumerate(rows):
        p = pair(i)
        chat = json.loads(p["messages"])
        assert r["ref_chosen"] == pytest.approx(response_logp(model, tok, chat, p["chosen"]), abs=1e-3)
        assert r["ref_rejected"] == pytest.approx(response_logp(model, tok, chat, p["rejected"]), abs=1e-3)
        assert r["chosen_len"] == sum(r["chosen_mask"]) > 0


def test_training_starts_at_log_2_and_moves_the_policy_towards_the_chosen(trained):
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray.tokenizer import from_dir

    cfg, target, result = trained
    assert result.status == "done"
    log = [json.loads(line) for line in open(f"{cfg.stage_dir('dpo')}/train_log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # dpo.max_steps, not train.max_steps
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3), "policy = reference at the start"
    assert steps[-1]["loss"] < steps[0]["loss"]
    tok = from_dir(target)
    policy = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("dpo"), dtype=torch.float32).eval()
    margins = []
    for r, i in zip(pq.read_table(dpo.data_dir(cfg)).to_pylist(), range(8), strict=True):
        chat = json.loads(pair(i)["messages"])
        margins.append((response_logp(policy, tok, chat, pair(i)["chosen"]) - r["ref_chosen"])
                       - (response_logp(policy, tok, chat, pair(i)["rejected"]) - r["ref_rejected"]))
    assert sum(margins) / len(margins) > 0 and sum(m > 0 for m in margins) >= 6, margins
    manifest = io.read_manifest(cfg.stage_dir("dpo"))
    assert manifest["stage"] == "dpo" and manifest["extra"]["loss"] == "sigmoid"
    # what this arm's objective used, and nothing of the distillation loss it did not use
    assert manifest["extra"]["objective"] == "preference" and "lambda_clm" not in manifest["extra"]
    assert manifest["extra"]["beta"] == cfg.implicit.dpo.beta
    assert manifest["extra"]["lr"] == (cfg.implicit.dpo.lr or cfg.train.lr)
    assert dpo.run(cfg, log=QUIET).status == "skipped"


def test_a_single_source_arm_is_scored_by_its_own_sft_model_and_trained_from_it(trained):
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray.tokenizer import from_dir

    cfg, target, result = trained
    assert set(result.parts) == {"fused", "only-b"}
    tok = from_dir(target)
    own = AutoModelForCausalLM.from_pretrained(f"{cfg.stage_dir('sft')}-only-b", dtype=torch.float32).eval()
    rows = pq.read_table(dpo.data_dir(cfg, "only-b")).to_pylist()
    fused = pq.read_table(dpo.data_dir(cfg)).to_pylist()
    assert [r["sample_id"] for r in rows] == [f"p{i}/b" for i in range(4)]
    for i, r in enumerate(rows):
        chat = json.loads(pair(i)["messages"])
        assert r["ref_chosen"] == pytest.approx(response_logp(own, tok, chat, pair(i)["chosen"]), abs=1e-3)
        assert abs(r["ref_chosen"] - fused[i]["ref_chosen"]) > 1e-2  # not the fused arm's reference
    log = [json.loads(line) for line in open(f"{cfg.stage_dir('dpo')}-only-b/train_log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    trained_b = AutoModelForCausalLM.from_pretrained(f"{cfg.stage_dir('dpo')}-only-b", dtype=torch.float32)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(trained_b.parameters(), own.parameters()))
    assert moved > 0  # trained from its own SFT weights, which it left
