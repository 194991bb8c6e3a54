"""The pipeline on a real 2-node Ray cluster on this machine (`cluster_helpers.LocalCluster`).

An HF cache laid out by `cluster_helpers.lay_out_hf_cache` resolves hub ids offline.

(a) A node is lost while `collect` runs: its engine actor and the blocks it held go with it;
    Ray Data retries the lost work on the surviving node and the driver's gatherer keeps the
    first copy of each `sample_id`, so every prepared row lands in `logits/` exactly once.
(b) The embedded default (`jobs/configs/tiny_cpu.yaml`, reduced) submitted with `ray job submit`,
    its workdir on an S3-compatible store (moto on loopback) and its models hub ids read from an
    offline HF cache (`HF_HUB_OFFLINE=1`): it succeeds, the bucket holds every stage's output and
    manifest, and no stage output lands on local disk. (That a store workdir computes what a local
    one does is checked in-process, by test_object_store_pipeline.py: a second job here cost ~12 min.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_helpers import REPO, LocalCluster, demo_hf_cache, lay_out_hf_cache
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.prepare import stage as prepare

QUIET = lambda *_: None  # noqa: E731
EXCLUDES = [".venv", "runs", ".git", "*.partial", "__pycache__", ".pytest_cache", ".ruff_cache", "bench/results"]
STAGE_OUTPUTS = ("prepared", "logits", "aligned", "fused", "targets", "merged", "report")


@pytest.fixture(scope="module")
def cluster():
    """A head of 3 logical CPUs (the drivers run here); tests add and remove worker nodes.

    Every node has its own cache (`FUSION_RAY_CACHE`: object-store copies), removed with it."""
    with LocalCluster(Path(f"/tmp/frc{os.getpid()}")) as c:
        c.start_head(num_cpus=3, env={"FUSION_RAY_CACHE": str(c.root / "cache-head")})
        yield c


# --- the offline HF cache ------------------------------------------------------------------------

HUB_PROBE = """
import json
from fusion_ray import locations
print(json.dumps({"dir": locations.local_dir("fusionray/tiny-x"), "config": locations.model_config("fusionray/tiny-x"),
                  "missing": locations.reachable("fusionray/absent")}))
"""


def test_hub_ids_resolve_from_the_laid_out_cache_offline(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 7}))
    (model / "model.safetensors").write_bytes(b"weights")
    snapshot = lay_out_hf_cache(tmp_path / "hf", {"fusionray/tiny-x": model})["fusionray/tiny-x"]
    assert len(snapshot.name) == 40 and (snapshot.parents[1] / "refs" / "main").read_text() == snapshot.name
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # read when the hub is imported
    out = subprocess.run([sys.executable, "-c", HUB_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dir"] == str(snapshot) and got["config"] == {"vocab_size": 7}
    assert "not found in the offline HF cache" in got["missing"]


# --- (a) a node lost mid-collect ---------------------------------------------------------------

# Ray 2.60's Parquet reader (`use_datasource_v2`) reads small files into one block whatever
# `override_num_blocks` says, which one engine actor would score alone; the v1 reader makes
# several, so both actors (one per node) have work when the node goes.
DRIVER = """
import sys
import ray.data
from fusion_ray import io
from fusion_ray.collect import stage as collect
from fusion_ray.config import load_config
from fusion_ray.ray_env import init_ray

cfg = load_config(sys.argv[1])
ray.data.DataContext.get_current().use_datasource_v2 = False
init_ray(cfg.ray)
prepared = cfg.stage_dir("prepare")
collect.collect_model(cfg, cfg.pivot, io.list_files(prepared), io.read_manifest(prepared)["fingerprint"])
print("COLLECTED")
"""


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_collect_survives_losing_a_node_and_keeps_every_row_once(cluster, tiny_models, tmp_path):
    # one 2-CPU engine actor fits on each 3-CPU node (the third CPU reads Parquet): one of the two
    # actors is on the node that goes
    node = cluster.add_node("n2", num_cpus=3, env={"FUSION_RAY_CACHE": str(tmp_path / "cache-n2")})
    corpus = write_jsonl(tmp_path / "many.jsonl", chat_rows(600))
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [corpus], data={"shard_rows": 20},
                      collect={"batch_size": 2, "concurrency": 2, "num_cpus_per_actor": 2})
    prepare.run(cfg, log=QUIET)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    log = tmp_path / "driver.log"
    with open(log, "wb") as fh:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(cfg_file)], stdout=fh, stderr=subprocess.STDOUT,
                                  env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address}, cwd=tmp_path)
    partial = cfg.stage_dir("collect", "pivot") + ".partial"
    try:
        deadline = time.monotonic() + 240
        while not (io.list_files(partial) and any("ScoreUDF" in " ".join(p.cmdline()) for p in node.processes())):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "collect did not start on both nodes:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        done_at_kill = len(io.list_files(partial))
        cluster.remove_node(node)  # SIGKILL to the node's raylet, agents and workers (its engine actor)
        assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        if node in cluster.nodes:
            cluster.remove_node(node)
    assert 0 < done_at_kill < 30, f"the node went {done_at_kill} shard(s) into 30: not mid-run"
    prepared = pq.read_table(cfg.stage_dir("prepare"), columns=["sample_id"]).column("sample_id").to_pylist()
    collected = pq.read_table(cfg.stage_dir("collect", "pivot"), columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(prepared) == 600
    assert collected == prepared  # every row once, in the prepared order
    assert [f.rsplit("/", 1)[1] for f in io.list_files(cfg.stage_dir("collect", "pivot"))] == \
        [f.rsplit("/", 1)[1] for f in io.list_files(cfg.stage_dir("prepare"))]
    assert io.read_manifest(cfg.stage_dir("collect", "pivot"))["rows"] == {"in": 600, "out": 600}


# --- (b) the embedded default as a job, workdir on S3, models from an offline HF cache ---------

# A reduced tiny_cpu: fewer rows, steps and held-out rows; the `hf` engine (vLLM's start-up on
# CPU would dominate). Same seeds in both runs.
REDUCED = ["collect.engine=hf", "data.train.0.max_rows=48", "data.train.1.max_rows=48", "train.max_steps=4",
           "eval.max_rows_per_domain=24"]


def job_overrides(workdir: str, hub_ids: dict[str, str]) -> list[str]:
    """Models as hub ids; the demo corpora by absolute path (built on this machine, which every
    node shares; `demo:` names would make a node with an empty cache build the assets)."""
    from fusion_ray.demo.assets import asset_path

    corpora = [f"data.{split}.{i}.path={asset_path(f'{domain}_{kind}')}"
               for split, kind in (("train", "train"), ("heldout", "heldout"))
               for i, domain in enumerate(("computing", "english"))]
    return [f"workdir={workdir}", f"pivot.path={hub_ids['pivot']}", f"sources.0.path={hub_ids['source_computing']}",
            f"sources.1.path={hub_ids['source_english']}", *corpora, *REDUCED]


def stage_outputs_on_disk(*roots: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Stage dirs (by name), manifests, model weights and `s3:` path components below `roots`."""
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in skip and d not in (".git", ".venv")]
            for name in dirnames:
                if name in STAGE_OUTPUTS or name.startswith("s3:") or name.endswith(".partial"):
                    found.add(str(here / name))
            for name in filenames:
                if name in ("_manifest.json", "model.safetensors", "train_log.jsonl", "report.json"):
                    found.add(str(here / name))
    return found


def bucket_keys(bucket: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_paginator("list_objects_v2")
    return [o["Key"] for page in pages.paginate(Bucket=bucket) for o in page.get("Contents", [])]


@pytest.mark.integration
@pytest.mark.timeout(2700)  # on a fresh machine this test builds the demo's trained models first (~12 min here)
def test_tiny_cpu_job_on_s3_with_hub_models(cluster, s3_server, tmp_path):
    hf_home = tmp_path / "hf"
    hub_ids = demo_hf_cache(hf_home)
    cluster.add_node("n3", num_cpus=2, env={"FUSION_RAY_CACHE": str(tmp_path / "cache-n3")})
    bucket = s3_server("fusion-cluster").removeprefix("s3://")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    # RAY_ADDRESS: Ray Train's placement-group cleaner finds its cluster by looking for Ray
    # processes on the machine, and fails ("Found multiple active Ray instances") where there are several
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES,
                   "env_vars": {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
                                "RAY_ADDRESS": cluster.gcs_address}}
    job = ["python", "-m", "jobs.pipeline", "--config", "jobs/configs/tiny_cpu.yaml"]
    skip = (hf_home, tmp_path / "cache-n3", cluster.root / "cache-head")
    before = stage_outputs_on_disk(cluster.root, tmp_path, REPO, skip=skip)

    started = time.monotonic()
    job_id = cluster.submit([*job, *job_overrides(f"s3://{bucket}/run", hub_ids)], runtime_env)
    status, logs = cluster.wait_job(job_id, timeout=1500)
    s3_wall = time.monotonic() - started
    assert status == "SUCCEEDED", logs[-5000:]
    for stage in ("prepare", "collect", "align", "fuse", "train", "merge", "eval"):
        assert f"[{stage}] done" in logs, stage

    keys = bucket_keys(bucket)
    manifests = {k.removeprefix("run/").removesuffix("/_manifest.json") for k in keys if k.endswith("_manifest.json")}
    assert {"prepared", "logits/pivot", "logits/computing", "logits/english", "aligned/computing",
            "aligned/english", "fused/computing", "fused/english", "targets/computing", "targets/english",
            "targets/clm_only", "merged", "report"} <= manifests, sorted(manifests)
    assert not [k for k in keys if ".partial" in k or ".tmp-" in k], "work in progress left on the store"
    assert {"run/report/report.json", "run/report/report.md", "run/merged/config.json"} <= set(keys)
    assert [k for k in keys if k.startswith("run/merged/") and k.endswith(".safetensors")]
    new_on_disk = stage_outputs_on_disk(cluster.root, tmp_path, REPO, skip=skip) - before
    assert not new_on_disk, f"stage output on local disk: {sorted(new_on_disk)[:20]}"
    report = json.loads(io.read_text(f"s3://{bucket}/run/report/report.json"))
    print(f"job wall: {s3_wall:.0f}s")
    assert set(report["bpb"]) >= {"pivot", "clm_only", "merged", "fused:computing", "fused:english"}
    assert all(0 < v < 10 for per_domain in report["bpb"].values() for v in per_domain.values()), report["bpb"]
