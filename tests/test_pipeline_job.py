"""The embedded defaults as real Ray jobs, and what their reports must show.

A local head is started with `ray start --head` (loopback, auth off, its own temp dir);
`ray job submit` sends `python -m jobs.pipeline --config jobs/configs/tiny_cpu.yaml`
with the repo as working dir; the test waits for SUCCEEDED and checks the outputs and
the report: every pairwise fused target beats the CLM-only arm on its source's domain,
and the merged model is no worse than the CLM-only arm on any domain, each beyond
the seed spread of Δbpb (`BPB_TOLERANCE`; those two tests carry the `regression` marker).

The implicit method's default (`jobs/configs/fusechat3_tiny.yaml`) goes to the same head: every
stage runs and every arm answers every held-out prompt; its report must show SFT and SFT+DPO above
the pivot in held-out accuracy by more than `ACCURACY_MARGIN` (`regression`). That DPO adds to SFT
is not asserted (over 3 seeds it did not: bench/implicit.py), nor that fusing beats the best single
source (+4.0 ± 4.3 points over 3 seeds: within the spread) (docs/design.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusion_ray import io, locations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]
REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", "runs", ".git", "*.partial", "__pycache__", ".pytest_cache", ".ruff_cache"]
# The job trains one seed, so its quality comparisons hold only beyond seed noise. bench/quality.py
# measured Δbpb against CLM-only over 3 seeds at this config's settings (λ 0.7, spans, `transferred`):
# the largest per-seed std is 0.0008 bpb (fused:computing −0.0124 ± 0.0008, fused:english −0.0362 ± 0.0004,
# merged SCE −0.0074 ± 0.0004 / −0.0153 ± 0.0001; bench/results/quality_cpu.jsonl, bench/RESULTS.md).
# Three times that: a fused arm must beat CLM-only by more than this, and the merged model may not be worse
# than CLM-only by more than this.
DELTA_BPB_SEED_STD = 0.0008
BPB_TOLERANCE = 3 * DELTA_BPB_SEED_STD
# Held-out accuracy on the implicit default (one seed; 224 arithmetic prompts): pivot 0.071, SFT 0.188
# to 0.241 and SFT+DPO 0.067 to 0.210 over the settings tried. The trained arms must beat the pivot by
# more than this (about 11 of 224 prompts).
ACCURACY_MARGIN = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp: Path) -> None:
    """Stop only the cluster rooted at `temp` (`ray stop` would stop every Ray here)."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=15)
    for p in alive:
        p.kill()


def wait_for_dashboard(address: str, timeout: float = 180) -> None:
    """`ray start` returns before the dashboard (the job server) answers; on a loaded machine, long before."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the dashboard at {address} did not come up"
        time.sleep(2)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = Path(f"/tmp/frh{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # Every fixed default port gets a free one: the session's own local Ray (other tests)
    # already holds the defaults, e.g. the dashboard agent's 52365 that job submission needs.
    ports = {flag: str(free_port()) for flag in ("--port", "--dashboard-agent-listen-port",
                                                 "--dashboard-agent-grpc-port", "--metrics-export-port",
                                                 "--runtime-env-agent-port", "--ray-client-server-port")}
    subprocess.run(["ray", "start", "--head", *[x for kv in ports.items() for x in kv], "--node-ip-address",
                    "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--num-cpus", "4", "--temp-dir", str(temp), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address)
        yield address, env
    finally:
        stop_head(temp)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def run_job(head, config: str, workdir: Path) -> str:
    """`ray job submit` of `jobs.pipeline` on `config` with `workdir`; its logs once it SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = head
    for _ in range(30):  # the job server answers before its agent is ready: "try again later"
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
             "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
             "python", "-m", "jobs.pipeline", "--config", config, f"workdir={workdir}"],
            env=env, capture_output=True, text=True, cwd=REPO)
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}"
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)  # the output carries colour codes
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 2700
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(5)
    logs = client.get_job_logs(job_id)
    status = client.get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


@pytest.fixture(scope="module")
def job(head, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("job") / "tiny_cpu"
    return workdir, run_job(head, "jobs/configs/tiny_cpu.yaml", workdir)


def test_job_ran_every_stage_and_wrote_the_report(job):
    workdir, logs = job
    for stage_dir in ("prepared", "logits", "aligned", "fused", "targets", "merged", "report"):
        assert (workdir / stage_dir).is_dir(), stage_dir
    for stage in ("prepare", "collect", "align", "fuse", "train", "merge", "eval"):
        assert f"[{stage}] done" in logs, stage
    report = json.loads((workdir / "report" / "report.json").read_text())
    arms = set(report["bpb"])
    assert {"pivot", "clm_only", "merged", "fused:computing", "fused:english", "source:computing",
            "source:english"} <= arms
    assert report["source_domain"] == {"computing": "computing", "english": "english"}
    # each arm's model as the config names it (a demo asset, hub id, URI) or its stage dir
    assert set(report["models"]) == arms
    assert report["models"]["source:computing"] == "demo:source_computing" and report["models"]["pivot"] == "demo:pivot"
    assert all(Path(locations.local_dir(p)).is_dir() for p in report["models"].values())
    png = (workdir / "report" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    md = (workdir / "report" / "report.md").read_text()
    assert "| merged |" in md and "Fuse routing" in md
    assert io.read_manifest(str(workdir / "report"))["stage"] == "eval"
    for stage in ("collect", "train"):
        assert report["stages"][stage]["wall_time_s"] > 0 and report["stages"][stage]["peak_rss_mb"] > 100
    stats = json.loads((workdir / "_stage_stats.json").read_text())  # eval's own, recorded after its report
    assert set(stats) == {"prepare", "collect", "align", "fuse", "train", "merge", "eval"}


@pytest.mark.regression
def test_fusion_beats_clm_only_on_each_sources_domain(job):
    workdir, _ = job
    report = json.loads((workdir / "report" / "report.json").read_text())
    bpb = report["bpb"]
    for source, domain in report["source_domain"].items():
        assert bpb[f"fused:{source}"][domain] < bpb["clm_only"][domain] - BPB_TOLERANCE, (source, bpb)


@pytest.mark.regression
def test_merged_is_no_worse_than_clm_only_anywhere(job):
    workdir, _ = job
    bpb = json.loads((workdir / "report" / "report.json").read_text())["bpb"]
    for domain, value in bpb["clm_only"].items():
        assert bpb["merged"][domain] <= value + BPB_TOLERANCE, (domain, bpb["merged"], bpb["clm_only"])


def test_rerun_skips_every_stage_and_the_demo_prints_the_report(job):
    workdir, _ = job
    out = subprocess.run([sys.executable, "-m", "fusion_ray.cli", "demo", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("prepare", "collect", "align", "fuse", "train", "merge", "eval"):
        assert f"[{stage}] skipped" in out.stdout, (stage, out.stdout[-3000:])
    assert f"{workdir}/report/report.md" in out.stdout


# --- the implicit method's embedded default ---------------------------------------------------------

IMPLICIT_ARMS = {"pivot", "sft", "dpo", "only-add", "only-sub", "only-mul"}


@pytest.fixture(scope="module")
def implicit_job(head, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("job") / "fusechat3_tiny"
    logs = run_job(head, "jobs/configs/fusechat3_tiny.yaml", workdir)
    return workdir, logs, json.loads((workdir / "report" / "report.json").read_text())


def test_implicit_job_ran_every_stage_and_every_arm_answered_every_heldout_prompt(implicit_job):
    workdir, logs, report = implicit_job
    for stage in ("sample", "reward", "pairs", "sft", "dpo", "eval"):
        assert f"[{stage}] done" in logs, stage
    for out in ("samples/add", "samples/sub", "samples/mul", "rewards", "pairs", "sft", "dpo", "report",
                *(f"{stage}-only-{s}" for stage in ("sft", "dpo") for s in ("add", "sub", "mul"))):
        assert io.read_manifest(str(workdir / out)) is not None, out
    assert set(report["models"]) == IMPLICIT_ARMS
    for arm, per_domain in report["counts"].items():
        assert all(c["answered"] == c["prompts"] > 0 for c in per_domain.values()), (arm, per_domain)
    assert set(report["accuracy"]["pivot"]) == {"arith"} and set(report["mean_reward"]["pivot"]) == {"arith", "open"}
    assert (workdir / "report" / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "| SFT+DPO |" in (workdir / "report" / "report.md").read_text()


@pytest.mark.regression
def test_implicit_sft_and_sft_dpo_beat_the_pivot(implicit_job):
    acc = implicit_job[2]["accuracy_all"]
    assert acc["sft"] > acc["pivot"] + ACCURACY_MARGIN and acc["dpo"] > acc["pivot"] + ACCURACY_MARGIN, acc
    assert implicit_job[2]["best_single"] in {"only-add", "only-sub", "only-mul"}


def test_implicit_rerun_with_fusion_ray_run_skips_every_stage(implicit_job):
    workdir = implicit_job[0]
    out = subprocess.run([sys.executable, "-m", "fusion_ray.cli", "run", "jobs/configs/fusechat3_tiny.yaml",
                          f"workdir={workdir}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("sample", "reward", "pairs", "sft", "dpo", "eval"):
        assert f"[{stage}] skipped" in out.stdout, (stage, out.stdout[-3000:])


def test_implicit_eval_with_a_chat_judge(implicit_job, tmp_path, monkeypatch):
    """The chat judge works on the implicit method too: `fusion-ray eval` on the finished run with
    eval.chat answers two two-turn questions with the pivot and SFT+DPO arms (hf engine) and a
    loopback judge grades them; held-out accuracy stays in the report beside the judge's scores."""
    from judge_server import JudgeServer, rating_for

    workdir = implicit_job[0]
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": "a", "category": "math", "turns": ["What is 3 + 4?", "And 4 + 3?"], "reference": ["7", "7"]},
        {"question_id": "b", "category": "writing", "turns": ["What is 9 - 5?", "Say it again."]}]) + "\n")
    monkeypatch.setenv("JUDGE_KEY", "k")
    with JudgeServer() as judge:
        out = subprocess.run(
            [sys.executable, "-m", "fusion_ray.cli", "eval", "jobs/configs/fusechat3_tiny.yaml", f"workdir={workdir}",
             f"eval.chat.questions={questions}", "eval.chat.arms=[pivot,dpo]", "eval.chat.engine=hf",
             "eval.chat.num_cpus=0.5", "eval.chat.sampling.max_tokens=16", f"eval.chat.judge.url={judge.url}",
             "eval.chat.judge.model=j", "eval.chat.judge.api_key_env=JUDGE_KEY", "eval.chat.judge.bootstrap=100"],
            capture_output=True, text=True, timeout=600, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(judge.calls) == 2 * 2 * 2, "2 arms × 2 questions × 2 turns, single grading"
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["accuracy_all"] == implicit_job[2]["accuracy_all"], "the held-out answers were reused"
    answers = [json.loads(line) for line in (workdir / "report" / "chat_answers.jsonl").read_text().splitlines()]
    for arm in ("pivot", "dpo"):
        mine = [a for a in answers if a["arm"] == arm]
        want = sum(sum(rating_for(x) for x in a["answers"]) / 2 for a in mine) / 2
        assert report["chat"]["judge"]["arms"][arm]["single"]["mean"] == pytest.approx(want)
    assert "judge score (1–10)" in (workdir / "report" / "report.md").read_text()
