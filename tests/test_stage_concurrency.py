"""Independent parts of a stage run side by side on the local Ray: collect per model, train per arm."""

import pytest
from helpers import fused_copy

from fusion_ray import io
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
def fused(tiny_fused):
    """The shared run (conftest's `tiny_fused`: the pivot and three sources collected side by side,
    `collect.max_concurrent_models` unset) and its collect result."""
    return tiny_fused.cfg, tiny_fused.collected


def with_train(cfg, workdir, **train):
    """The gpt source's fused data under another workdir, with `TRAIN` and these settings."""
    return fused_copy(cfg, workdir, **{**TRAIN, **train})


def test_collect_of_two_models_overlaps(fused):
    _, collected = fused
    models = collected.parts
    assert [r.status for r in models.values()] == ["done"] * 4
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
