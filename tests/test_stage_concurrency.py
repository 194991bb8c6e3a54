"""Independent parts of a stage run side by side on the local Ray: collect per model, train per arm."""

import shutil

import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.align import stage as align
from fusion_ray.collect import stage as collect
from fusion_ray.fuse import stage as fuse
from fusion_ray.prepare import stage as prepare
from fusion_ray.train import stage as trainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731
# 2 arms × 1 worker × 0.5 CPU next to Ray Data's read and shuffle tasks, on 4 logical CPUs
TRAIN = {"strategy": "ddp", "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4,
         "micro_batch_size": 2, "max_steps": 3, "checkpoint_every": 3, "lr": 1e-3, "lambda_clm": 0.5,
         "clm_only_arm": True, "bf16": False}


def overlap(a, b) -> bool:
    """Whether two parts' results (`StageResult`) ran at the same time."""
    a, b = a.figures, b.figures
    return max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"])


@pytest.fixture(scope="module")
def fused(tiny_models, tmp_path_factory, ray_local):
    """prepare → collect (2 models at once) → align → fuse; the collect result is kept."""
    tmp = tmp_path_factory.mktemp("concurrency")
    corpus = write_jsonl(tmp / "c.jsonl", chat_rows(24))
    cfg = make_config(tmp / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")}, [corpus],
                      train=TRAIN)
    prepare.run(cfg, log=QUIET)
    collected = collect.run(cfg, log=QUIET)
    for stage in (align, fuse):
        stage.run(cfg, log=QUIET)
    return cfg, collected


def with_train(cfg, workdir, **train):
    """The same fused data under another workdir, with train settings changed."""
    out = cfg.model_copy(deep=True)
    out.workdir = str(workdir)
    for key, value in train.items():
        setattr(out.train, key, value)
    shutil.copytree(cfg.stage_dir("fuse", "gpt"), out.stage_dir("fuse", "gpt"))
    return out


def test_collect_of_two_models_overlaps(fused):
    _, collected = fused
    models = collected.parts
    assert [r.status for r in models.values()] == ["done", "done"]
    assert overlap(models["pivot"], models["gpt"]), models


def test_training_arms_overlap(fused, tmp_path):
    """Both arms' `fit()` run at once (one at a time, `train.max_concurrent_arms: 1`, measured
    62 s vs 81 s here for these two arms: tests/test_parallel.py covers the limit)."""
    cfg, _ = fused
    run_cfg = with_train(cfg, tmp_path / "w")
    lines = []
    targets = trainer.run(run_cfg, log=lines.append).parts
    assert [t.status for t in targets.values()] == ["done", "done"]
    for name in ("gpt", "clm_only"):
        assert io.read_manifest(run_cfg.stage_dir("train", name))["extra"]["metrics"]["step"] == 3
        assert any(line.startswith(f"[train] {name}: ") for line in lines), lines  # each line names its arm
    assert overlap(targets["gpt"], targets["clm_only"]), targets
