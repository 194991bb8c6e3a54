"""The embedded defaults as a user runs them, and what their reports must show.

One run per method, shared by every assertion about it: `fusion-ray demo` (the README's first
command) and `fusion-ray run jobs/configs/fusechat3_tiny.yaml` (its implicit default), each in a
subprocess from the repo root. `.ci/run` runs both commands from the README first, exactly as
written, and hands their workdirs over in `FUSION_RAY_E2E_RUNS` (a dir holding `tiny_cpu/` and
`fusechat3_tiny/`): then the fixture's own run finds every stage finished and skips it (that
rerun is what the skip tests check), and the assertions read what the README's commands wrote.
Without the variable the fixture runs each method from scratch in a temp dir. Every assertion
reads the run's files (manifests, `_stage_stats.json`, the report), never its terminal output,
so both ways check the same thing. `ray job submit` of `jobs.pipeline` is test_cluster.py's.

Explicit: every pairwise fused target beats the CLM-only arm on its source's domain, and the
merged model is no worse than the CLM-only arm on any domain, each beyond the seed spread of
Δbpb (`BPB_TOLERANCE`; those two tests carry the `regression` marker).

Implicit (`jobs/configs/fusechat3_tiny.yaml`): every stage runs and every arm answers every
held-out prompt; its report must show SFT and SFT+DPO above the pivot in held-out accuracy by
more than `ACCURACY_MARGIN` (`regression`). That DPO adds to SFT is not asserted (over 3 seeds it
did not: bench/implicit.py), nor that fusing beats the best single source (+4.0 ± 4.3 points over
3 seeds: within the spread) (docs/design.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_ray import io, locations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]
REPO = Path(__file__).resolve().parents[1]
RUNS_ENV = "FUSION_RAY_E2E_RUNS"
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
EXPLICIT_STAGES = ("prepare", "collect", "align", "fuse", "train", "merge", "eval")
IMPLICIT_STAGES = ("sample", "reward", "pairs", "sft", "dpo", "eval")


def workdir_for(name: str, tmp_path_factory) -> Path:
    """`$FUSION_RAY_E2E_RUNS/<name>` (the README commands' run, in CI), else a fresh temp dir."""
    given = os.environ.get(RUNS_ENV)
    return Path(given) / name if given else tmp_path_factory.mktemp("e2e") / name


def cli(*args: str, timeout: float = 2700) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "fusion_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def ran(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The explicit default's workdir and the stdout of this fixture's `fusion-ray demo` on it."""
    workdir = workdir_for("tiny_cpu", tmp_path_factory)
    return workdir, ran(cli("demo", "--workdir", str(workdir))).stdout


def test_job_ran_every_stage_and_wrote_the_report(job):
    workdir, _ = job
    for stage_dir in ("prepared", "logits", "aligned", "fused", "targets", "merged", "report"):
        assert (workdir / stage_dir).is_dir(), stage_dir
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
    stats = json.loads((workdir / "_stage_stats.json").read_text())  # eval's own, recorded after its report
    assert set(stats) == {"prepare", "collect", "align", "fuse", "train", "merge", "eval"}
    for stage in ("collect", "train"):  # a stage of parts run side by side: its own time, not their sum
        assert report["stages"][stage]["wall_time_s"] == stats[stage]["last_run_wall_s"] > 0
        assert report["stages"][stage]["peak_rss_mb"] > 100


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
    workdir, first = job
    out = ran(cli("demo", "--workdir", str(workdir), timeout=600)) if "[train] done" in first else None
    stdout = (out or subprocess.CompletedProcess([], 0, first, "")).stdout
    for stage in EXPLICIT_STAGES:
        assert f"[{stage}] skipped" in stdout, (stage, stdout[-3000:])
    assert f"{workdir}/report/report.md" in stdout
    assert "Traceback" not in stdout


# --- the implicit method's embedded default ---------------------------------------------------------

IMPLICIT_ARMS = {"pivot", "sft", "dpo", "only-add", "only-sub", "only-mul"}


@pytest.fixture(scope="module")
def implicit_job(tmp_path_factory):
    workdir = workdir_for("fusechat3_tiny", tmp_path_factory)
    out = ran(cli("run", "jobs/configs/fusechat3_tiny.yaml", f"workdir={workdir}"))
    return workdir, out.stdout, json.loads((workdir / "report" / "report.json").read_text())


def test_implicit_job_ran_every_stage_and_every_arm_answered_every_heldout_prompt(implicit_job):
    workdir, _, report = implicit_job
    assert set(json.loads((workdir / "_stage_stats.json").read_text())) == set(IMPLICIT_STAGES)
    for out in ("samples/add", "samples/sub", "samples/mul", "rewards", "pairs", "sft", "dpo", "report",
                *(f"{stage}-only-{s}" for stage in ("sft", "dpo") for s in ("add", "sub", "mul"))):
        assert io.read_manifest(str(workdir / out)) is not None, out
    assert set(report["models"]) == IMPLICIT_ARMS
    for arm, per_domain in report["counts"].items():
        assert all(c["answered"] == c["prompts"] > 0 for c in per_domain.values()), (arm, per_domain)
    assert set(report["accuracy"]["pivot"]) == {"arith"} and set(report["mean_reward"]["pivot"]) == {"arith", "open"}
    assert (workdir / "report" / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "| SFT+DPO |" in (workdir / "report" / "report.md").read_text()
    # the independent judge compared every arm with the pivot and with SFT on the open held-out prompts
    judge = report["chat"]["judge"]
    assert judge["kind"] == "reward model" and "judge_tiny" in judge["model"]
    assert report["chat"]["questions"] == report["counts"]["pivot"]["open"]["prompts"] > 0
    assert set(judge["arms"]["dpo"]["pairwise"]) == {"pivot", "sft"} and set(judge["arms"]["sft"]["pairwise"]) == {"pivot"}
    for arm, res in judge["arms"].items():
        for base, p in res["pairwise"].items():
            assert p["n"] == report["chat"]["questions"] and p["ci"][0] <= p["win_rate"] <= p["ci"][1], (arm, base)
    assert "win rate vs sft" in (workdir / "report" / "report.md").read_text()


@pytest.mark.regression
def test_implicit_sft_and_sft_dpo_beat_the_pivot(implicit_job):
    acc = implicit_job[2]["accuracy_all"]
    assert acc["sft"] > acc["pivot"] + ACCURACY_MARGIN and acc["dpo"] > acc["pivot"] + ACCURACY_MARGIN, acc
    assert implicit_job[2]["best_single"] in {"only-add", "only-sub", "only-mul"}


def test_implicit_rerun_with_fusion_ray_run_skips_every_stage(implicit_job):
    workdir, first, _ = implicit_job
    stdout = first if "[sft] done" not in first else ran(cli(
        "run", "jobs/configs/fusechat3_tiny.yaml", f"workdir={workdir}", timeout=600)).stdout
    for stage in IMPLICIT_STAGES:
        assert f"[{stage}] skipped" in stdout, (stage, stdout[-3000:])


def test_implicit_eval_with_a_chat_judge(implicit_job, tmp_path, monkeypatch):
    """The chat judge works on the implicit method too: the eval stage alone, as a cluster job runs it
    (`python -m jobs.stage eval`), on the finished run with
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
            [sys.executable, "-m", "jobs.stage", "eval", "--config", "jobs/configs/fusechat3_tiny.yaml",
             f"workdir={workdir}",
             f"eval.chat.questions={questions}", "eval.chat.arms=[pivot,dpo]", "eval.chat.engine=hf",
             "eval.chat.num_cpus=0.5", "eval.chat.sampling.max_tokens=16", f"eval.chat.judge.url={judge.url}",
             "eval.chat.judge.model=j", "eval.chat.judge.api_key_env=JUDGE_KEY", "eval.chat.judge.bootstrap=100",
             "eval.chat.judge.reward_model=null", "eval.chat.judge.modes=[single]", "eval.chat.judge.baseline=pivot"],
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
