"""The whole pipeline with its workdir, its models and its corpus on a real S3-compatible server.

Models and the corpus are uploaded to the bucket and named by `s3://` URIs; every stage reads
and writes there; nothing of a stage's output lands on local disk outside the node caches;
a rerun skips every stage; the same run on a local workdir, from the local files, gives the same
bpb for every arm (that run is the CLI's, conftest's `cli_project`, which test_front_door checks).
"""

import os
from pathlib import Path

import pytest
from helpers import pipeline_config

from fusion_ray import io, locations
from fusion_ray.config import parse_config
from fusion_ray.pipeline import PIPELINE_STAGES, run_stages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
QUIET = lambda *_: None  # noqa: E731
STAGE_DIRS = ("prepared", "logits/pivot", "logits/gpt", "aligned/gpt", "fused/gpt", "targets/gpt",
              "targets/clm_only", "merged", "report")


@pytest.fixture(scope="module")
def runs(cli_project, ray_local, s3_server):
    """The pipeline of conftest's `cli_project` (its models and corpus uploaded to a bucket, its
    config naming them by URI, the workdir on the bucket), run by `run_stages` on the local Ray."""
    project, _ = cli_project
    bucket = s3_server("fusion-runs")
    for local, key in (("models/pivot", "models/pivot"), ("models/gpt", "models/gpt"),
                       ("data/train.jsonl", "data/train.jsonl"), ("data/heldout.jsonl", "data/heldout.jsonl")):
        locations.upload(project / local, f"{bucket}/{key}")
    remote = parse_config(pipeline_config(f"{bucket}/run", f"{bucket}/models/pivot", f"{bucket}/models/gpt",
                                          f"{bucket}/data/train.jsonl", f"{bucket}/data/heldout.jsonl"))
    before = set(_local_files())
    remote_results = run_stages(remote, PIPELINE_STAGES, log=QUIET)
    new_local = sorted(set(_local_files()) - before)
    return remote, remote_results, new_local


def _local_files() -> list[str]:
    """Files below the places a stage could leave output by mistake: cwd and the temp dirs."""
    roots = [Path.cwd(), Path("/tmp")]
    out = []
    for root in roots:
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(("ray", "pytest-of", ".", "tmp"))
                           and "cache" not in d]
            out += [os.path.join(dirpath, f) for f in files]
    return out


def test_every_stage_dir_is_in_the_bucket_with_its_manifest(runs):
    remote, results, *_ = runs
    for stage in PIPELINE_STAGES:
        assert results[stage].status == "done", stage
    for sub in STAGE_DIRS:
        manifest = io.read_manifest(f"{remote.workdir}/{sub}")
        assert manifest is not None, f"no manifest at {remote.workdir}/{sub}"
    names = {n for n, _, _ in locations.listing(remote.stage_dir("train", "gpt"))}
    assert {"config.json", "model.safetensors", "train_log.jsonl", "tokenizer.json", "_manifest.json"} <= names
    merged = {n for n, _, _ in locations.listing(remote.stage_dir("merge"))}
    assert {"config.json", "_manifest.json", "tokenizer.json", "merge_config.yaml"} <= merged
    assert any(n.endswith(".safetensors") for n in merged)
    assert any(n.startswith("_ray_train/") for n, _, _ in locations.listing(remote.workdir)), "checkpoints"


def test_the_train_log_reached_the_bucket(runs):
    remote, *_ = runs
    log = io.read_text(remote.stage_dir("train", "gpt") + "/train_log.jsonl").splitlines()
    assert [__import__("json").loads(line)["step"] for line in log] == [1, 2, 3]


def test_no_stage_output_on_local_disk_outside_the_caches(runs):
    """Nothing of this run on local disk: no stage dir in the working dir, and no local path anywhere
    under it or /tmp that names the bucket (what a stage treating the URI as a path would make).
    Other processes on the machine may write stage dirs of their own below /tmp, so /tmp is only
    searched for this run's bucket."""
    _, _, new_local = runs
    cwd = str(Path.cwd())
    stage_like = [f for f in new_local if f.startswith(cwd) and (
        any(f"/{d}/" in f for d in ("prepared", "logits", "aligned", "fused", "targets", "merged", "report"))
        or f.endswith("_manifest.json"))]
    assert stage_like == []
    assert [f for f in new_local if "fusion-runs" in f] == []


def test_a_rerun_on_the_store_skips_every_stage(runs):
    remote, *_ = runs
    again = run_stages(remote, PIPELINE_STAGES, log=QUIET)
    assert {s: r.status for s, r in again.items()} == {s: "skipped" for s in PIPELINE_STAGES}


def test_a_local_workdir_run_gives_the_same_report(runs, cli_project):
    """The store changes where bytes live, not what is computed: the same config on local files (the
    CLI's run of `cli_project`), same seeds, same bpb per arm."""
    import json

    remote, *_ = runs
    project, local_run = cli_project
    assert local_run.returncode == 0, local_run.stderr[-3000:]
    on_store = json.loads(io.read_text(remote.stage_dir("eval") + "/report.json"))["bpb"]
    on_disk = json.loads((project / "runs" / "rel" / "report" / "report.json").read_text())["bpb"]
    assert set(on_store) == set(on_disk) >= {"pivot", "clm_only", "fused:gpt", "merged"}
    for arm, per_domain in on_disk.items():
        for domain, value in per_domain.items():
            assert on_store[arm][domain] == pytest.approx(value, abs=1e-4), (arm, domain)
