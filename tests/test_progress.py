"""Progress output off a terminal (fusion_ray/progress.py): no bars in the driver nor in the workers."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_ray import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clean(monkeypatch):
    """No progress variable set, nothing applied yet; the environment restored afterwards."""
    for key in progress.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(progress, "_applied", {})
    return monkeypatch


def test_off_a_terminal_progress_is_turned_off_for_this_process_and_the_workers(clean):
    env = progress.quiet_progress(io.StringIO())
    assert env == progress.QUIET_ENV == progress.worker_env()
    assert all(os.environ[k] == v for k, v in progress.QUIET_ENV.items())


def test_at_a_terminal_nothing_changes(clean):
    assert progress.quiet_progress(Terminal()) == {}
    assert progress.worker_env() == {}
    assert not any(k in os.environ for k in progress.QUIET_ENV)


def test_a_variable_the_user_set_is_left_as_it_is(clean):
    clean.setenv("TQDM_DISABLE", "0")
    env = progress.quiet_progress(io.StringIO())
    assert os.environ["TQDM_DISABLE"] == "0" and "TQDM_DISABLE" not in env
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_init_ray_hands_the_settings_to_the_workers_and_quiets_ray_data(clean, address):
    """What `ray.init` receives off a terminal. Joining a running cluster: the progress variables
    in the runtime env. A local Ray: no runtime env (its workers inherit this process's environment,
    where they are set; one more runtime env would start a pool of workers of its own)."""
    import logging

    import ray
    from ray.data import DataContext

    from fusion_ray.config import RayConfig
    from fusion_ray.ray_env import init_ray

    seen = {}
    clean.delenv("RAY_ADDRESS", raising=False)
    clean.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    clean.setattr(sys, "stdout", io.StringIO())
    clean.setattr(ray, "is_initialized", lambda: False)
    clean.setattr(ray, "init", lambda **kw: seen.update(kw))
    ctx = DataContext.get_current()
    clean.setattr(ctx, "enable_progress_bars", True)
    handlers = logging.getLogger("ray.data").handlers
    for h in handlers:
        clean.setattr(h, "level", h.level)  # restored afterwards
    init_ray(RayConfig(address=address))
    if address:
        assert {k: seen["runtime_env"]["env_vars"][k] for k in progress.QUIET_ENV} == progress.QUIET_ENV
    else:
        assert seen["address"] == "local" and "runtime_env" not in seen
        assert {k: os.environ[k] for k in progress.QUIET_ENV} == progress.QUIET_ENV
    assert ctx.enable_progress_bars is False
    console = [h for h in handlers if type(h).__name__ != "SessionFileHandler"]
    assert console and all(h.level >= logging.WARNING for h in console), "dataset INFO lines go to the file only"


BAR = "from tqdm import tqdm\nfor _ in tqdm(range(3)): pass\n"


@pytest.mark.parametrize("quiet", [False, True])
def test_a_tqdm_bar_writes_nothing_once_quieted(quiet):
    """In a process whose output goes to a pipe: a bar writes its redraws, unless the CLI's
    `quiet_progress` ran first (the variables tqdm reads at import)."""
    env = {k: v for k, v in os.environ.items() if k not in progress.QUIET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(progress.__file__).parents[1]), env.get("PYTHONPATH", "")])
    code = ("from fusion_ray import progress; progress.quiet_progress()\n" if quiet else "") + BAR
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (out.stderr == "") is quiet, out.stderr


def test_off_a_terminal_ray_train_logs_its_info_lines_to_its_files_only(clean):
    import logging

    from ray.train.v2._internal.execution import context

    assert progress.train_log_level() == "INFO"
    reports = logging.getLogger(context.__file__)  # where Ray Train logs each `ray.train.report`
    clean.setattr(reports, "level", reports.level)  # restored afterwards
    progress.quiet_train_worker()
    assert reports.level < logging.WARNING, "at a terminal (no quiet variable) nothing changes"
    progress.quiet_progress(io.StringIO())
    assert progress.train_log_level() == "WARNING"
    progress.quiet_train_worker()
    assert not reports.isEnabledFor(logging.INFO)
