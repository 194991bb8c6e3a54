"""The `sft` stage on a local Ray: hand-made SFT rows encoded with the target's template, then Ray Train
(DDP on gloo) trains the target on the response tokens only into an HF model dir."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_ray import io
from fusion_ray.config import parse_config
from fusion_ray.pairs.stage import SFT
from fusion_ray.sft import stage as sft

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("sft")
    target = tiny_models("qwen2", "gpt2")
    (tmp / "p.jsonl").write_text(json.dumps({"id": "x", "prompt": "q", "answer": "1"}) + "\n")
    cfg = parse_config({
        "name": "sft-test", "workdir": str(tmp / "w"), "method": "implicit",
        "pivot": {"name": "target", "path": str(target), "dtype": "float32"},
        "sources": [{"name": "a", "path": str(target)}, {"name": "b", "path": str(target)}],
        "data": {"max_length": 64},
        "implicit": {"prompts": [{"path": str(tmp / "p.jsonl"), "verify": "math"}], "single_source_arms": ["b"]},
        "train": {"strategy": "ddp", "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4,
                  "micro_batch_size": 2, "max_steps": 3, "lr": 1e-3, "bf16": False, "checkpoint_every": 3},
        "ray": {"num_cpus": 4},
    })
    rows = [{"prompt_id": f"p{i}", "domain": "arith", "source": "a", "sample_index": 0, "reward": 1.0,
             "messages": json.dumps([{"role": "user", "content": f"What is {i} + {i}?"}]),
             "response": f"{i} + {i} = {2 * i}. The answer is {2 * i}."} for i in range(10)]
    out = io.begin(cfg.stage_dir("pairs"), "handmade")
    out.write_table("sft/part-00000.parquet", pa.Table.from_pylist(rows[:6], schema=SFT))
    out.write_table("sft/part-00001.parquet", pa.Table.from_pylist(rows[6:], schema=SFT))
    only_b = [{**r, "source": "b", "response": f"It is {2 * i}."} for i, r in enumerate(rows[:4])]
    out.write_table("only-b/sft/part-00000.parquet", pa.Table.from_pylist(only_b, schema=SFT))
    out.commit(io.Manifest(stage="pairs", fingerprint="handmade", config_hash="-"))
    return cfg, target, rows, sft.run(cfg, log=QUIET)


def test_rows_are_encoded_with_the_response_tokens_scored(trained):
    from transformers import AutoTokenizer

    cfg, target, rows, _ = trained
    tok = AutoTokenizer.from_pretrained(target)
    data = pq.read_table(sft.data_dir(cfg)).to_pylist()
    assert [r["sample_id"] for r in data] == [r["prompt_id"] for r in rows]
    for row, src in zip(data, rows, strict=True):
        ids, mask = row["input_ids"], row["loss_mask"]
        scored = tok.decode([t for t, m in zip(ids[1:], mask, strict=True) if m])
        assert scored.startswith(src["response"]) and "What is" not in scored
        assert len(row["topk_ids"]) == sum(mask)
    assert io.read_manifest(sft.data_dir(cfg))["rows"] == {"in": 10, "out": 10}


def test_the_target_is_trained_on_them_into_a_chat_model_dir(trained):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, target, _, result = trained
    assert result.status == "done"
    log = [json.loads(line) for line in open(f"{cfg.stage_dir('sft')}/train_log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["clm"]) for r in log if "loss" in r), "λ = 1: the loss is the CLM"
    manifest = io.read_manifest(cfg.stage_dir("sft"))
    assert manifest["stage"] == "sft" and manifest["extra"]["lambda_clm"] == 1.0
    assert manifest["extra"]["objective"] == "clm"
    model = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft"))
    base = AutoModelForCausalLM.from_pretrained(target)
    assert sum((a - b).abs().sum() for a, b in zip(model.parameters(), base.parameters())) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (pq.read_table(sft.data_dir(cfg)).num_rows, sft.run(cfg, log=QUIET).status) == (10, "skipped")


def test_a_single_source_arm_is_trained_beside_the_fused_one_on_its_own_rows(trained):
    from transformers import AutoModelForCausalLM

    cfg, _, _, result = trained
    assert set(result.parts) == {"fused", "only-b"}
    data = pq.read_table(sft.data_dir(cfg, "only-b")).to_pylist()
    assert [r["sample_id"] for r in data] == ["p0", "p1", "p2", "p3"]
    manifest = io.read_manifest(f"{cfg.stage_dir('sft')}-only-b")
    assert manifest["rows"] == {"in": 4} and manifest["inputs"]["sft_data"] != io.read_manifest(
        cfg.stage_dir("sft"))["inputs"]["sft_data"]
    fused = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft"))
    alone = AutoModelForCausalLM.from_pretrained(f"{cfg.stage_dir('sft')}-only-b")
    assert sum((a - b).abs().sum() for a, b in zip(fused.parameters(), alone.parameters())) > 0
