"""The pipeline on a real 2-node Ray cluster on this machine (`cluster_helpers.LocalCluster`).

(a) A node is lost while `collect` runs: its engine actor and the blocks it held go with it;
    Ray Data retries the lost work on the surviving node and the driver's gatherer keeps the
    first copy of each `sample_id`, so every prepared row lands in `logits/` exactly once.
(b) The embedded default (`jobs/configs/tiny_cpu.yaml`, reduced) submitted with `ray job submit`,
    its workdir on an S3-compatible store (moto on loopback) and its models hub ids read from an
    offline HF cache (`HF_HUB_OFFLINE=1`): it succeeds, the bucket holds every stage's output and
    manifest, no stage output lands on local disk, and its report equals a local-workdir run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_helpers import LocalCluster
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.collect import prepare

pytestmark = pytest.mark.slow
QUIET = lambda *_: None  # noqa: E731
EXCLUDES = [".venv", "runs", ".git", "*.partial", "__pycache__", ".pytest_cache", ".ruff_cache", "bench/results"]
STAGE_OUTPUTS = ("prepared", "logits", "aligned", "fused", "targets", "merged", "report")


@pytest.fixture(scope="module")
def cluster():
    """A head of 3 logical CPUs (the drivers run here); tests add and remove worker nodes."""
    with LocalCluster(Path(f"/tmp/frc{os.getpid()}")) as c:
        c.start_head(num_cpus=3)
        yield c


# --- (a) a node lost mid-collect ---------------------------------------------------------------

# Ray 2.60's Parquet reader (`use_datasource_v2`) reads small files into one block whatever
# `override_num_blocks` says, which one engine actor would score alone; the v1 reader makes
# several, so both actors (one per node) have work when the node goes.
DRIVER = """
import sys
import ray.data
from fusion_ray import io
from fusion_ray.collect import pipeline
from fusion_ray.config import load_config
from fusion_ray.ray_env import init_ray

cfg = load_config(sys.argv[1])
ray.data.DataContext.get_current().use_datasource_v2 = False
init_ray(cfg.ray)
prepared = cfg.stage_dir("prepare")
pipeline.collect_model(cfg, cfg.pivot, io.list_files(prepared), io.read_manifest(prepared)["fingerprint"])
print("COLLECTED")
"""


@pytest.mark.timeout(600)
def test_collect_survives_losing_a_node_and_keeps_every_row_once(cluster, tiny_models, tmp_path):
    # one 2-CPU engine actor fits on each 3-CPU node (the third CPU reads Parquet): one of the two
    # actors is on the node that goes
    node = cluster.add_node("n2", num_cpus=3, env={"FUSION_RAY_CACHE": str(tmp_path / "cache-n2")})
    corpus = write_jsonl(tmp_path / "many.jsonl", chat_rows(600))
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [corpus], collect={"batch_size": 2, "shard_rows": 20, "concurrency": 2,
                                         "num_cpus_per_actor": 2})
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
    assert 0 < done_at_kill < 30, f"the node went {done_at_kill} shard(s) into 30: not mid-run"
    prepared = pq.read_table(cfg.stage_dir("prepare"), columns=["sample_id"]).column("sample_id").to_pylist()
    collected = pq.read_table(cfg.stage_dir("collect", "pivot"), columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(prepared) == 600
    assert collected == prepared  # every row once, in the prepared order
    assert [f.rsplit("/", 1)[1] for f in io.list_files(cfg.stage_dir("collect", "pivot"))] == \
        [f.rsplit("/", 1)[1] for f in io.list_files(cfg.stage_dir("prepare"))]
    assert io.read_manifest(cfg.stage_dir("collect", "pivot"))["rows"] == {"in": 600, "out": 600}
