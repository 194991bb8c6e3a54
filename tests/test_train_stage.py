"""The train stage: Ray Train DDP on gloo, one target per source plus the CLM-only arm."""

import json

import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.align import pipeline as align
from fusion_ray.collect import pipeline as collect
from fusion_ray.collect import prepare
from fusion_ray.fuse import pipeline as fuse
from fusion_ray.pipeline import StageNotBuilt
from fusion_ray.train import trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("train")
    corpus = write_jsonl(tmp / "c.jsonl", chat_rows(32))
    cfg = make_config(tmp / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")}, [corpus],
                      train={"strategy": "ddp", "num_workers": 2, "cpus_per_worker": 0.5, "global_batch_size": 8,
                             "micro_batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "lr": 1e-3,
                             "lambda_clm": 0.5, "clm_only_arm": True, "bf16": False})
    for stage in (prepare, collect, align, fuse):
        stage.run(cfg, log=QUIET)
    result = trainer.run(cfg, log=QUIET)
    return cfg, result


def test_targets_are_hf_chat_models_that_moved_from_the_pivot(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result = trained
    assert set(result["targets"]) == {"gpt", "clm_only"}
    pivot = AutoModelForCausalLM.from_pretrained(cfg.pivot.path)
    for name in ("gpt", "clm_only"):
        path = cfg.stage_dir("train", name)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.chat_template and tok.pad_token_id is not None
        delta = sum((a - b).abs().sum() for a, b in zip(model.parameters(), pivot.parameters()))
        assert delta > 0, "training changed the weights"
        ids = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True), return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()


def test_metrics_log_and_manifest(trained):
    cfg, _ = trained
    fused = io.read_manifest(cfg.stage_dir("train", "gpt"))
    clm = io.read_manifest(cfg.stage_dir("train", "clm_only"))
    assert fused["extra"]["metrics"]["step"] == 4 and fused["extra"]["lambda_clm"] == 0.5
    assert clm["extra"]["lambda_clm"] == 1.0 and clm["extra"]["metrics"]["fusion"] == 0.0
    log = [json.loads(line) for line in open(f"{cfg.stage_dir('train', 'gpt')}/train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["fusion"] > 0 and 0 <= r["transferred"] <= 1 and r["tokens_per_s"] > 0 for r in log)
    lrs = [r["lr"] for r in log]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0], "cosine decay after a 1-step warmup"


def test_finished_targets_are_skipped(trained):
    cfg, _ = trained
    statuses = {n: r["status"] for n, r in trainer.run(cfg, log=QUIET)["targets"].items()}
    assert statuses == {"gpt": "skipped", "clm_only": "skipped"}


def test_deepspeed_strategy_fails_clearly_before_work(trained):
    cfg, _ = trained
    ds = cfg.model_copy(deep=True)
    ds.train.strategy = "deepspeed"
    with pytest.raises(StageNotBuilt, match="deepspeed is not built yet"):
        trainer.run(ds, log=QUIET)


def test_fused_data_for_another_vocabulary_fails_naming_both_sizes(trained, tmp_path):
    import shutil

    cfg, _ = trained
    bad = cfg.model_copy(deep=True)
    bad.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.stage_dir("fuse", "gpt"), bad.stage_dir("fuse", "gpt"))
    path = f"{bad.stage_dir('fuse', 'gpt')}/_manifest.json"
    manifest = json.loads(open(path).read())
    assert manifest["extra"]["pivot_vocab"] == 515
    manifest["extra"]["pivot_vocab"] = 32000
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(ValueError, match="pivot vocabulary of 32000 tokens, but the model .* embedding of 515"):
        trainer.train_arm(bad, "gpt", "fused", "gpt", log=QUIET)
    assert not (tmp_path / "w" / "targets").exists()
