"""Relative paths made absolute on the driver; a failure's root cause under Ray's wrappers;
what reaches the terminal. Unit tier: no Ray started (Ray's exception classes only)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from fusion_ray import console, locations
from fusion_ray.config import parse_config
from fusion_ray.errors import InputError, describe, is_input_error, root_cause
from fusion_ray.pipeline import relative_path_problems


def config(tmp_path: Path) -> dict:
    return {"name": "rel", "workdir": "runs/rel",
            "pivot": {"name": "pivot", "path": "models/pivot"},
            "sources": [{"name": "a", "path": "demo:source_computing"}, {"name": "b", "path": "org/hub-model"}],
            "data": {"train": [{"path": "data/train.jsonl"}, {"path": "s3://bucket/train.jsonl"}]},
            "train": {"tracking": {"backend": "mlflow", "tracking_uri": "mlruns"}},
            "serve": {"adapters": {"x": "adapters/x"}}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "models" / "pivot").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "adapters" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_local_paths_become_absolute_against_the_working_directory(project):
    cfg = parse_config(config(project))
    assert cfg.workdir == str(project / "runs" / "rel")
    assert cfg.pivot.path == str(project / "models" / "pivot")
    assert cfg.data.train[0].path == str(project / "data" / "train.jsonl")
    assert cfg.train.tracking.tracking_uri == str(project / "mlruns")
    assert cfg.serve.adapters == {"x": str(project / "adapters" / "x")}
    # demo assets, hub ids and URIs as written
    assert [s.path for s in cfg.sources] == ["demo:source_computing", "org/hub-model"]
    assert cfg.data.train[1].path == "s3://bucket/train.jsonl"
    assert cfg._relative_paths == {"workdir": "runs/rel", "pivot.path": "models/pivot",
                                   "data.train.0.path": "data/train.jsonl", "train.tracking.tracking_uri": "mlruns",
                                   "serve.adapters.x": "adapters/x"}


def test_a_config_on_the_wire_keeps_the_drivers_absolute_paths(project, tmp_path_factory, monkeypatch):
    from fusion_ray.config import FusionConfig

    cfg = parse_config(config(project))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # a worker's own directory
    again = FusionConfig.from_wire(json.loads(json.dumps(cfg.to_wire())))
    assert again == cfg and again.workdir == str(project / "runs" / "rel")


def test_absolute_leaves_what_is_not_a_local_path():
    assert locations.absolute("s3://b/k") == "s3://b/k" and locations.absolute("demo:pivot") == "demo:pivot"
    assert locations.absolute("org/name-that-is-not-here") == "org/name-that-is-not-here"
    assert locations.absolute("org/name-that-is-not-here", path_only=True).startswith("/")
    assert locations.absolute("x/../y", base="/base") == "/base/y"
    assert locations.absolute("/already/abs") == "/already/abs"


def test_relative_paths_refused_where_they_differ_per_node(project, monkeypatch):
    cfg = parse_config(config(project))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert relative_path_problems(cfg) == []
    lines = relative_path_problems(cfg, nodes=3)
    assert len(lines) == len(cfg._relative_paths) and all("s3://" in line for line in lines)
    assert lines[0].startswith("workdir: relative path 'runs/rel': on a Ray cluster of 3 nodes")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg"}}))
    (line,) = relative_path_problems(cfg)
    assert line.startswith("workdir: relative path 'runs/rel': in a `ray job submit --working-dir` job")
    absolute = parse_config({**config(project), "workdir": str(project / "w")})
    assert relative_path_problems(absolute) == []


def test_the_root_cause_under_ray_trains_and_rays_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    missing = FileNotFoundError(2, "No such file or directory", "/w/fused/a/part-00003.parquet")
    group = WorkerGroupError("rank 1 failed", {1: UserExceptionWithTraceback(missing, "Traceback ...\n"),
                                               0: UserExceptionWithTraceback(RuntimeError("gloo"), "x")})
    assert root_cause(group) is group.worker_failures[0]._base_exc  # the lowest rank
    group = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(missing, "Traceback ...\n")})
    assert root_cause(group) is missing and is_input_error(group)
    assert describe(group) == "FileNotFoundError: [Errno 2] No such file or directory: '/w/fused/a/part-00003.parquet'"
    task = RayTaskError("fn", "Traceback (most recent call last): ...", InputError("row 3: no messages"))
    assert describe(task) == "InputError: row 3: no messages" and is_input_error(task)
    assert not is_input_error(RuntimeError("connection reset by peer"))


def test_the_terminal_keeps_our_lines_and_the_log_keeps_everything(tmp_path):
    terminal, log = io.StringIO(), io.StringIO()
    router = console.Router(terminal, log)
    lines = ["[collect] pivot: 10 rows", "\x1b[36m(RayTrainWorker pid=12)\x1b[0m [train] fused:a step 1/3 loss 2.1",
             "\x1b[36m(RayTrainWorker pid=12)\x1b[0m Traceback (most recent call last):",
             "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started",
             "(MapWorker(MapBatches(ScoreUDF)) pid=4718) WARNING 12-06 [cpu_worker.py:140] skip it"]
    for line in lines:
        router.write(line[:5])
        router.write(line[5:] + "\n")
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines]
    assert plain[1] == "(RayTrainWorker pid=12) [train] fused:a step 1/3 loss 2.1"
    assert terminal.getvalue().splitlines() == plain[:2], "no colour codes where the terminal is not one"
    assert log.getvalue().splitlines() == plain, "the log file: every line, no colour codes"


def test_known_harmless_lines_go_to_the_log_only():
    """What a successful run printed that a user takes for an error (Ray's E-level core line, the GCS
    at a pool's end, DeepSpeed's CPU notice, Ray Data's bars notice, a worker's progress bar) is
    kept in the log and off the terminal; an unknown warning of the driver still shows."""
    terminal, log = io.StringIO(), io.StringIO()
    router = console.Router(terminal, log)
    harmless = [
        "[2026-12-06 07:27:04,929 E 8418 8896] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
        "ScoreUDF))' and ID: 'd7' has constructor arguments in the object store and max_restarts > 0. If the "
        "arguments in the object store go out of scope or are lost, the actor restart will fail.",
        "(pid=gcs_server) [2026-12-06 07:29:15,558 E 8459 8459] (gcs_server) gcs_actor_scheduler.cc:538: Failed to "
        "kill actor 16df7795, return status: Invalid: KillActor RPC failed for actor 16df7795: RpcError",
        "[2026-12-06 07:23:37,041] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
        "If you have GPU or other accelerator, we were unable to detect it.",
        "2026-12-06 07:27:04,948\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
        "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "[transformers] `loss_type=None` was set in the config but it is unrecognized. Using the default loss."]
    for line in harmless:
        router.write(line + "\n")
    router.write("\x1b[36m(MapWorker(MapBatches(ScoreUDF)) pid=8953)\x1b[0m Loading safetensors checkpoint shards:"
                 "   0% Completed | 0/1 [00:00<?, ?it/s]\r")
    router.write("\n")  # the newline that ends the bar, in a write of its own: no blank line for it
    router.write("[collect] pivot: 10 rows\nWARNING something new\n")
    assert terminal.getvalue().splitlines() == ["[collect] pivot: 10 rows", "WARNING something new"]
    assert log.getvalue().splitlines()[:len(harmless)] == harmless


def test_what_c_code_writes_to_descriptor_2_is_routed_too(tmp_path):
    """Ray's driver core writes its ERROR lines to descriptor 2 itself, past `sys.stderr`: `route`
    reads that descriptor through a pipe, so a known-harmless one stays in the log file and any
    other reaches the terminal, at exit too."""
    import subprocess
    import sys

    log = tmp_path / "run.log"
    code = ("import os\nfrom pathlib import Path\nfrom fusion_ray import console\n"
            f"console.route(Path({str(log)!r}))\n"
            "os.write(2, b'[2026 E 1 2] core_worker.cc:2465: Actor X has constructor arguments in the object store "
            "and max_restarts > 0.\\n')\n"
            "os.write(2, b'[2026 E 1 2] raylet_client.cc:9: something else went wrong\\n')\n"
            "print('[run] done', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[run] done\n"
    assert "something else went wrong" in out.stderr and "constructor arguments" not in out.stderr
    kept = log.read_text()
    assert "constructor arguments in the object store" in kept and "something else went wrong" in kept


def test_colour_codes_reach_a_real_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Tty(), io.StringIO()
    line = "\x1b[36m(RayTrainWorker pid=12)\x1b[0m [train] fused:a step 1/3 loss 2.1"
    console.Router(terminal, log).write(line + "\n")
    assert terminal.getvalue() == line + "\n"
    assert log.getvalue() == "(RayTrainWorker pid=12) [train] fused:a step 1/3 loss 2.1\n"
