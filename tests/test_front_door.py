"""The front door: a project outside the repo, every path of its config relative, run from its
own directory by the CLI as a user would; and how a run that fails ends.

Ray Train's workers run in directories of their own: a relative workdir or corpus path read
there names another file (on 86ff168 train's workers failed with FileNotFoundError on
`runs/…/fused/…/part-00000.parquet`). Paths are made absolute on the driver, when the config is
loaded, against the directory the command runs from.

A failed stage ends the command with one line on stderr naming the stage, the part and the
cause, exit status ≠ 0, no traceback at the terminal (it goes to a file below the workdir);
an error a retry cannot fix is not retried by Ray Train (its failure policy's own log counts
the attempts).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CLI_RAY_TMP
from helpers import fusion_ray_cli as fusion_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]


def one_line(out: subprocess.CompletedProcess) -> str:
    """The run failed and ended in one line on stderr; no traceback anywhere on the terminal and no
    other line that reads as an error (Ray's start-up INFO line with the dashboard's URL may stay)."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stdout + out.stderr, (out.stdout[-3000:], out.stderr[-3000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and not [x for x in lines[:-1] if "error" in x.lower()], out.stderr[-3000:]
    return lines[-1]


def failure_decisions() -> list[str]:
    """Ray Train's failure-policy decisions (`RETRY` / `RAISE`) in the session logs below `CLI_RAY_TMP`."""
    found = []
    for path in sorted(CLI_RAY_TMP.rglob("*")):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            text = path.read_text(errors="replace")
            found += re.findall(r"\[FailurePolicy\] (RETRY|RAISE)", text)
    return found


@pytest.fixture(scope="module")
def project(cli_project):
    """The project (conftest's `cli_project`: every path of `fusion.yaml` relative)."""
    return cli_project[0]


@pytest.fixture(scope="module")
def trained(cli_project):
    """`fusion-ray run fusion.yaml` from the project's own directory: the whole pipeline."""
    return cli_project[1]


def test_relative_paths_from_the_projects_own_directory(trained, project):
    """Train's workers read the fused shards of a relative workdir (they failed on 86ff168)."""
    assert trained.returncode == 0, (trained.stdout[-3000:], trained.stderr[-3000:])
    workdir = project / "runs" / "rel"
    assert json.loads((workdir / "targets" / "gpt" / "_manifest.json").read_text())["stage"] == "train"
    snapshot = json.loads((workdir / "targets" / "gpt" / "_config.json").read_text())
    assert snapshot["workdir"] == str(workdir) and snapshot["pivot"]["path"] == str(project / "models" / "pivot")
    assert not (REPO / "runs" / "rel").exists()
    logs = sorted((workdir / "logs").glob("run-*.log"))
    assert logs and "[train] done" in logs[-1].read_text()
    assert f"[run] log: {logs[-1]}" in trained.stdout
    # a successful run shows no line a user would take for an error: Ray's E-level lines, warnings
    shown = (trained.stdout + trained.stderr).splitlines()
    alarming = [line for line in shown if re.search(r"\bE \d+ \d+\]|\bWARNING\b|\bERROR\b|Traceback", line)]
    assert not alarming, alarming[:5]


def test_a_missing_fused_shard_ends_in_one_line_before_training(trained, project):
    fused = project / "runs" / "rel" / "fused" / "gpt"
    shard = fused / "part-00001.parquet"
    aside = project / "aside.parquet"
    shard.rename(aside)
    try:
        out = fusion_ray(project, "train", "fusion.yaml", "--force")
    finally:
        aside.rename(shard)
    line = one_line(out)
    assert line.startswith("error: [train] failed (gpt): InputError: ") and "part-00001.parquet" in line, line
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert log.parent == project / "runs" / "rel" / "logs" and "Traceback" in log.read_text()
    assert failure_decisions().count("RETRY") == 0


def test_malformed_shards_fail_on_the_workers_once_not_retried(trained, project):
    """Shards the driver's checks pass (their row counts are right) but the workers cannot read as
    fused rows: the input error is raised on the first try, though train.max_failures is 2."""
    fused = project / "runs" / "rel" / "fused" / "gpt"
    shards = sorted(fused.glob("part-*.parquet"))
    aside = project / "aside"
    aside.mkdir()
    before = len(failure_decisions())
    try:
        for shard in shards:
            rows = pq.read_metadata(shard).num_rows
            shard.rename(aside / shard.name)
            pq.write_table(pa.table({"unrelated": list(range(rows))}), shard)
        out = fusion_ray(project, "train", "fusion.yaml", "--force")
    finally:
        for shard in shards:
            (aside / shard.name).replace(shard)
        aside.rmdir()
    line = one_line(out)
    assert line.startswith("error: [train] failed (gpt): "), line
    decisions = failure_decisions()[before:]
    assert decisions == ["RAISE", "RAISE"], decisions  # each arm (gpt, clm_only) raised on its first try


def test_a_bad_config_key_ends_in_one_line_before_any_work(project):
    out = fusion_ray(project, "run", "fusion.yaml", "train.no_such_key=1", timeout=120)
    line = one_line(out)
    assert "train.no_such_key: unknown key" in line and out.returncode == 2, line
    assert not (project / "runs" / "bad").exists()


def test_a_corpus_removed_between_prepare_and_collect(trained, project):
    out = fusion_ray(project, "prepare", "fusion.yaml", "workdir=runs/removed")
    assert out.returncode == 0, out.stderr[-2000:]
    corpus, aside = project / "data" / "train.jsonl", project / "aside.jsonl"
    corpus.rename(aside)
    try:
        out = fusion_ray(project, "collect", "fusion.yaml", "workdir=runs/removed", timeout=120)
    finally:
        aside.rename(corpus)
    line = one_line(out)
    assert line.startswith("[collect] invalid config fusion.yaml: data.train.0.path: corpus path does not exist: "
                           f"data/train.jsonl ({corpus})"), line
    assert not (project / "runs" / "removed" / "logits").exists()
