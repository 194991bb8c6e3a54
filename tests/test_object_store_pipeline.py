"""The whole pipeline with its workdir, its models and its corpus on a real S3-compatible server.

Models and the corpus are uploaded to the bucket and named by `s3://` URIs; every stage reads
and writes there; nothing of a stage's output lands on local disk outside the node caches;
a rerun skips every stage; the same run on a local workdir, from the local files, gives the same
bpb for every arm.
"""

import os
from pathlib import Path

import pytest
from helpers import chat_rows, write_jsonl

from fusion_ray import io, locations
from fusion_ray.config import parse_config
from fusion_ray.pipeline import PIPELINE_STAGES, run_stages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
QUIET = lambda *_: None  # noqa: E731
SECTIONS = {
    "train": {"strategy": "ddp", "num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4,
              "micro_batch_size": 4, "max_steps": 3, "checkpoint_every": 2, "lr": 1e-3, "lambda_clm": 0.7,
              "clm_only_arm": True, "bf16": False, "fusion_positions": "transferred"},
    "merge": {"method": "sce", "variant": "fusechat", "dtype": "float32"},
    "eval": {"batch_size": 8},
}
STAGE_DIRS = ("prepared", "logits/pivot", "logits/gpt", "aligned/gpt", "fused/gpt", "targets/gpt",
              "targets/clm_only", "merged", "report")


def config(workdir: str, pivot: str, source: str, train: str, heldout: str):
    data = {
        "name": "s3test", "workdir": workdir,
        "pivot": {"name": "pivot", "path": pivot, "dtype": "float32"},
        "sources": [{"name": "gpt", "path": source, "dtype": "float32", "domain": "computing"}],
        "data": {"train": [{"path": train, "domain": "computing"}], "max_length": 128, "shard_rows": 10,
                 "heldout": [{"path": heldout, "domain": "computing"}]},
        "collect": {"engine": "hf", "top_k": 4, "batch_size": 8, "num_cpus_per_actor": 0.5, "dtype": "float32"},
        "align": {"num_cpus": 0.5}, "fuse": {"num_cpus": 0.5},
        "ray": {"num_cpus": 4}, **SECTIONS,
    }
    return parse_config(data)


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory, ray_local, s3_server):
    tmp = tmp_path_factory.mktemp("s3run")
    bucket = s3_server("fusion-runs")
    pivot, source = tiny_models("qwen2", "deepseek"), tiny_models("gpt2", "gpt2")
    train = write_jsonl(tmp / "train.jsonl", chat_rows(24))
    heldout = write_jsonl(tmp / "heldout.jsonl", chat_rows(8, start=100))
    for local, key in ((pivot, "models/pivot"), (source, "models/gpt"), (train, "data/train.jsonl"),
                       (heldout, "data/heldout.jsonl")):
        locations.upload(local, f"{bucket}/{key}")
    remote = config(f"{bucket}/run", f"{bucket}/models/pivot", f"{bucket}/models/gpt",
                    f"{bucket}/data/train.jsonl", f"{bucket}/data/heldout.jsonl")
    before = set(_local_files())
    remote_results = run_stages(remote, PIPELINE_STAGES, log=QUIET)
    new_local = sorted(set(_local_files()) - before)
    return remote, remote_results, new_local, (pivot, source, train, heldout, tmp)


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
    _, _, new_local, _ = runs
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


def test_a_local_workdir_run_gives_the_same_report(runs):
    """The store changes where bytes live, not what is computed: same seeds, same bpb per arm."""
    import json

    remote, *_, (pivot, source, train, heldout, tmp) = runs
    local = config(str(tmp / "local"), str(pivot), str(source), str(train), str(heldout))
    run_stages(local, PIPELINE_STAGES, log=QUIET)
    on_store = json.loads(io.read_text(remote.stage_dir("eval") + "/report.json"))["bpb"]
    on_disk = json.loads((tmp / "local" / "report" / "report.json").read_text())["bpb"]
    assert set(on_store) == set(on_disk) >= {"pivot", "clm_only", "fused:gpt", "merged"}
    for arm, per_domain in on_disk.items():
        for domain, value in per_domain.items():
            assert on_store[arm][domain] == pytest.approx(value, abs=1e-4), (arm, domain)
