"""Benchmark the pipeline's cluster-facing costs on this machine.

(a) `s3_vs_local_wall`: every stage of a reduced embedded default (`jobs/configs/tiny_cpu.yaml`
    with fewer rows and steps, the `hf` engine) with its workdir on an S3-compatible store
    (a moto server on loopback, started here) vs on local disk; the runs alternate
    (S3, local, S3, local, …) after one unmeasured warm-up run; the figure is the ratio of the
    median total wall times (goal ≤ 1.3), with the per-stage medians printed.
(b) `concurrent_vs_sequential_train_wall`: the train stage (every arm of the reduced demo: one
    target per source and the CLM-only arm) with all arms at once vs one after the other,
    in the order A B B A …, ratio of medians. The switch is `train.max_concurrent_arms` (None: all at once,
    1: one after the other); where the config does not have it yet, (b) is reported as null.

Every run calls `fusion_ray.pipeline.run_stages` (the code that ships) in this process, on one
local Ray (`ray.num_cpus` of the config).

Usage: python bench/cluster.py [--rounds 2] [--rows 48] [--steps 4] [--train-rounds 1] [--train-steps 8] [--parts a,b]
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
# The config key that runs the train stage's arms side by side; `CONCURRENT` / `SEQUENTIAL` its values.
CONCURRENCY_SWITCH, CONCURRENT, SEQUENTIAL = "train.max_concurrent_arms", "null", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> subprocess.Popen:
    """A moto S3 server on loopback; its address and keys go into this process's environment
    (before Ray starts, so every worker gets them too)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return proc


def reduced(workdir: str, rows: int, steps: int, *extra: str):
    from fusion_ray.config import load_config

    return load_config(CONFIG, [f"workdir={workdir}", "collect.engine=hf", f"data.train.0.max_rows={rows}",
                                f"data.train.1.max_rows={rows}", f"train.max_steps={steps}",
                                f"eval.max_rows_per_domain={rows // 2}", *extra])


def timed_stages(cfg, stages, force: bool = False) -> dict[str, float]:
    """Wall time of each stage, run one at a time through `run_stages`."""
    from fusion_ray.pipeline import run_stages

    walls = {}
    for stage in stages:
        started = time.monotonic()
        result = run_stages(cfg, [stage], force=force, log=lambda *_: None)[stage]
        walls[stage] = time.monotonic() - started
        if result.status == "skipped":
            raise RuntimeError(f"{stage} was skipped in {cfg.workdir}: a fresh workdir was expected")
    return walls


def s3_vs_local(args, tmp: Path) -> dict:
    from fusion_ray.pipeline import PIPELINE_STAGES

    stages = list(PIPELINE_STAGES)
    print(f"(a) warm-up run (local workdir: vocabulary maps, worker imports) — {args.rows} rows/domain, "
          f"{args.steps} train steps")
    warm = timed_stages(reduced(str(tmp / "warmup"), args.rows, args.steps), stages)
    print(f"    warm-up {sum(warm.values()):.1f}s")
    runs: dict[str, list[dict[str, float]]] = {"s3": [], "local": []}
    for r in range(args.rounds):
        for arm in ("s3", "local"):
            workdir = f"s3://bench/run-{r}" if arm == "s3" else str(tmp / f"run-{r}")
            walls = timed_stages(reduced(workdir, args.rows, args.steps), stages)
            runs[arm].append(walls)
            print(f"    round {r + 1} {arm:5s}: {sum(walls.values()):6.1f}s  "
                  + " ".join(f"{s} {w:.1f}" for s, w in walls.items()))
    med = {arm: {s: statistics.median(w[s] for w in runs[arm]) for s in stages} for arm in runs}
    totals = {arm: statistics.median(sum(w.values()) for w in runs[arm]) for arm in runs}
    print("    stage      s3 (median s)  local (median s)  ratio")
    for s in stages:
        print(f"    {s:9s} {med['s3'][s]:14.1f} {med['local'][s]:17.1f} {med['s3'][s] / med['local'][s]:6.2f}")
    ratio = totals["s3"] / totals["local"]
    print(f"    total     {totals['s3']:14.1f} {totals['local']:17.1f} {ratio:6.2f}  (goal <= 1.3)")
    return {"ratio": round(ratio, 3), "s3_median_s": round(totals["s3"], 1),
            "local_median_s": round(totals["local"], 1),
            "by_stage": {s: round(med["s3"][s] / med["local"][s], 3) for s in stages}}


def concurrent_vs_sequential(args, tmp: Path) -> dict | None:
    from fusion_ray.config import TrainConfig
    from fusion_ray.pipeline import PIPELINE_STAGES

    if CONCURRENCY_SWITCH.split(".")[1] not in TrainConfig.model_fields:
        print(f"(b) skipped: the config has no {CONCURRENCY_SWITCH} yet (concurrent train arms are not in this "
              "branch)")
        return None
    workdir = str(tmp / "train")
    base = reduced(workdir, args.rows, args.train_steps)
    timed_stages(base, PIPELINE_STAGES[:PIPELINE_STAGES.index("train")])  # fused data, once
    arms = 1 + len(base.sources) if base.train.clm_only_arm else len(base.sources)
    print(f"(b) train stage, {arms} arms × {args.train_steps} steps, all at once vs one after the other")
    warm = timed_stages(reduced(workdir, args.rows, args.train_steps, f"{CONCURRENCY_SWITCH}={SEQUENTIAL}"),
                        ["train"], force=True)["train"]  # the first Ray Train run of a process pays start-up costs
    print(f"    warm-up (sequential, not counted): {warm:6.1f}s")
    walls: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    for r in range(args.train_rounds):
        modes = (("concurrent", CONCURRENT), ("sequential", SEQUENTIAL))
        for mode, value in modes if r % 2 == 0 else modes[::-1]:  # A B B A: neither always goes first
            cfg = reduced(workdir, args.rows, args.train_steps, f"{CONCURRENCY_SWITCH}={value}")
            wall = timed_stages(cfg, ["train"], force=True)["train"]
            walls[mode].append(wall)
            print(f"    round {r + 1} {mode:10s}: {wall:6.1f}s")
    ratio = statistics.median(walls["concurrent"]) / statistics.median(walls["sequential"])
    print(f"    concurrent / sequential = {ratio:.2f}")
    return {"ratio": round(ratio, 3), "concurrent_s": [round(w, 1) for w in walls["concurrent"]],
            "sequential_s": [round(w, 1) for w in walls["sequential"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="S3 and local runs each (alternating)")
    parser.add_argument("--rows", type=int, default=48, help="training conversations per domain")
    parser.add_argument("--steps", type=int, default=4, help="train steps per arm in (a)")
    parser.add_argument("--train-rounds", type=int, default=1, help="concurrent and sequential runs each in (b)")
    parser.add_argument("--train-steps", type=int, default=8, help="train steps per arm in (b)")
    parser.add_argument("--parts", default="a,b", help="which figures: a (S3 vs local), b (train arms), or both")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    from fusion_ray.config import RayConfig, load_config
    from fusion_ray.demo.builds import ensure_assets
    from fusion_ray.ray_env import init_ray

    ensure_assets()
    s3 = start_s3()
    tmp = Path(tempfile.mkdtemp(prefix="fusion-ray-bench-cluster-"))
    ray = None
    try:
        ray = init_ray(RayConfig(num_cpus=load_config(CONFIG).ray.num_cpus), include_dashboard=False,
                       log_to_driver=False)
        started = time.monotonic()
        a = s3_vs_local(args, tmp) if "a" in parts else None
        b = concurrent_vs_sequential(args, tmp) if "b" in parts else None
        print(f"bench wall {time.monotonic() - started:.0f}s")
        print(json.dumps({"s3_vs_local_wall": a and a["ratio"], "concurrent_vs_sequential_train_wall": b and b["ratio"],
                          "s3_vs_local": a, "concurrent_vs_sequential_train": b,
                          "switch": CONCURRENCY_SWITCH, "rows_per_domain": args.rows, "rounds": args.rounds}))
    finally:
        if ray is not None:
            ray.shutdown()
        s3.terminate()
        s3.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
