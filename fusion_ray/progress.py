"""Progress output that reads well in a log file.

At a terminal, progress bars redraw in place. Sent to a file or a pipe (`fusion-ray demo > log`,
`ray job submit`), each redraw is kept, and Ray Data's periodic progress report and the libraries'
tqdm bars (transformers, vLLM, huggingface_hub, DeepSpeed) bury the stages' own lines. So when this
process's stdout is not a terminal, `quiet_progress` turns them off here and, through environment
variables, in every Ray worker and actor too (a worker's stdout is never a terminal, so the driver
decides): a local Ray started by `init_ray` inherits them; a driver joining a running cluster hands
them over in `ray.init`'s runtime env (`worker_env`); a job from `ray job submit` takes its workers'
variables from the job's runtime env (`env_vars`), where they can be set. Ray Data's progress
stays on the dashboard; each stage part writes one line with its counts, rate and elapsed time
(`rate`). A variable already set in the environment is left as it is (the user's choice; on
`ray job submit` the job's runtime env).
"""

from __future__ import annotations

import os
import sys

QUIET = "FUSION_RAY_QUIET_PROGRESS"
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data: no bars, nor the report it logs every 10 s off a terminal
    "TQDM_DISABLE": "1",  # tqdm reads `TQDM_*` defaults from the environment: every bar that does not ask
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's bars, and transformers' (it follows the hub's)
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's ~30 start-up INFO lines per engine
    QUIET: "1",  # ours: Ray Train's INFO lines to its log files only (`train_log_level`, `quiet_train_worker`)
}

_applied: dict[str, str] = {}  # what `quiet_progress` set in this process


def interactive(stream=None) -> bool:
    """Whether `stream` (default: stdout) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_progress(stream=None) -> dict[str, str]:
    """When `stream` (default: stdout) is not a terminal, turn progress bars off in this process
    and remember the variables set for the workers (`worker_env`); at a terminal, do nothing.
    Safe to call more than once. Returns the variables set so far."""
    if interactive(stream):
        return dict(_applied)
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = _applied[key] = value
    _quiet_imported_libraries()
    return dict(_applied)


def worker_env() -> dict[str, str]:
    """The variables `quiet_progress` set, for the `env_vars` of a Ray runtime environment."""
    return dict(_applied)


def train_log_level() -> str:
    """Ray Train's console log level (`ray.train.LoggingConfig`): WARNING off a terminal, where its
    INFO lines (worker groups starting, resources requested) go to its log files only."""
    return "WARNING" if os.environ.get(QUIET) == "1" else "INFO"


def quiet_train_worker() -> None:
    """In a Ray Train worker off a terminal: no INFO line per `ray.train.report` (the whole metrics
    dict, from every rank; the training loop writes its own step line). Ray Train logs it under its
    module's file name, which its `LoggingConfig` does not reach."""
    if os.environ.get(QUIET) != "1":
        return
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: leave it as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _quiet_imported_libraries() -> None:
    """Libraries already imported read the variables at import: tell them directly (only what
    this process's `quiet_progress` chose; a variable the user set is theirs)."""
    if "RAY_DATA_DISABLE_PROGRESS_BARS" in _applied and "ray.data" in sys.modules:
        quiet_ray_data()
    if "HF_HUB_DISABLE_PROGRESS_BARS" in _applied:
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def quiet_ray_data() -> None:
    """Ray Data in this process (the driver): no progress bars or progress report, and its INFO
    lines (each dataset's start and execution plan) only in the session's `ray-data.log`, not on
    the console. Imports `ray.data`. A no-op unless `quiet_progress` turned progress off."""
    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in _applied:
        return
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(max(handler.level, logging.WARNING))


def rate(count: int, seconds: float, unit: str = "rows") -> str:
    """`"1,200 rows in 3.0s (400.0 rows/s)"`: a stage part's count, elapsed time and rate."""
    per_s = f"{count / seconds:,.1f}" if seconds > 0 else "-"
    return f"{count:,} {unit} in {seconds:.1f}s ({per_s} {unit}/s)"
