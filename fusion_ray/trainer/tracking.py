"""Experiment tracking of a training run (`train.tracking`): MLflow or Weights & Biases through Ray
Train's own integrations (`ray.air.integrations.mlflow.setup_mlflow`, `…wandb.setup_wandb`), on
rank 0 only, one run per arm (named `<run_name or name>-<stage>-<target>`).

What a run holds: every optimizer step's metrics, at that step (loss, clm, fusion, transferred,
or the preference loss's statistics for `dpo`; lr, tokens_per_s, step_s); as parameters, the whole
config flattened (`config.train.lr`, `config.sources.0.name`, …), the run's fingerprint, its data's
(`data_fingerprint.<input>`), its pivot's and what the stage adds (dpo: `sft_fingerprint`), and
the config hash; as tags, stage, target and arm, plus `train.tracking.tags`.

Tracking never breaks training: anything that fails in it (package missing on the worker, no
tracking URI, server unreachable, a rejected value) prints one line, records a `tracking_off`
event in `train_log.jsonl`, and tracking stays off for the rest of that run while training goes
on. An unreachable server costs about `timeout_s × (max_retries + 1)` once (MLflow's HTTP client is
held to those through its MLFLOW_HTTP_REQUEST_* environment variables in the worker).

The run's id goes into `train_log.jsonl` (a `tracking` event), which every checkpoint carries:
a run restarted from a checkpoint goes on in the same tracking run. The steps between that
checkpoint and the failure are logged twice there (metrics cannot be taken back); the later value
is the one that trained on. Secrets never come from the config (`config.TrackingConfig`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from fusion_ray import locations
from fusion_ray.errors import one_line

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # backend → the module it imports
INSTALL = {"mlflow": "mlflow-skinny", "wandb": "wandb"}  # backend → the PyPI package
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter's value
PARAMS_PER_CALL = 100  # MLflow's limit on parameters in one batch


def missing_package(backend: str) -> str | None:
    """Why `backend` cannot run in this Python (its package is not importable), or None."""
    module = PACKAGES.get(backend)
    if module is None:
        return None
    found = sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module) is not None
    if found:
        return None
    return (f"backend {backend} needs the {INSTALL[backend]} package, which is not installed here: "
            f"pip install 'fusion-ray[tracking]' (or {INSTALL[backend]})")


def flatten(data, prefix: str = "") -> dict[str, str]:
    """A nested config as `a.b.0.c` → value text, each value cut to MLflow's limit."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple) and data:
        items = enumerate(data)
    else:
        text = "" if data is None else str(data)
        return {prefix: text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class TrackingOff(Exception):
    """Tracking cannot run for this run (the message says why); training goes on."""


def mlflow_uri(settings, workdir: str) -> str:
    """The tracking URI: the env var `tracking_uri_env` names, `tracking_uri`, MLFLOW_TRACKING_URI,
    else MLflow's file store in `<workdir>/mlruns` on a local workdir."""
    if settings.tracking_uri_env:
        uri = os.environ.get(settings.tracking_uri_env)
        if not uri:
            raise TrackingOff(f"the env var {settings.tracking_uri_env} (train.tracking.tracking_uri_env) is not "
                              f"set in the training worker's environment")
        return uri
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if locations.is_remote(workdir):
        raise TrackingOff("no tracking URI: set train.tracking.tracking_uri (or MLFLOW_TRACKING_URI); the "
                          "workdir is on an object store, where MLflow cannot keep its files")
    return str(Path(workdir).expanduser().absolute() / "mlruns")


def is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


class Tracker:
    """Rank 0's tracking run. A no-op on the other ranks, when `train.tracking.backend` is none,
    and from the first failure on (`off`)."""

    def __init__(self, run_name: str = "", log=None):
        self.run_name, self.log = run_name, log  # log: rank 0's TrainLog, which records the events
        self.backend: str | None = None
        self.where = ""  # the backend and where it writes, for the warning (never a URI from an env var)
        self.secret: str | None = None  # the env var a secret URI came from: library messages are not shown
        self.run_id: str | None = None
        self._log_metrics = self._end = None

    @classmethod
    def start(cls, cfg, run: dict | None, rank: int, log, step: int = 0) -> Tracker:
        """Open (or, after a restart, reopen) the arm's run. Never raises."""
        s = cfg.train.tracking
        if s.backend == "none" or rank != 0 or not run:
            return cls()
        tracker = cls(run["run_name"], log)
        resume = tracker.resume_id(s.backend)
        try:
            tracker._start(cfg, s, run, resume)
        except Exception as e:  # noqa: BLE001 (whatever fails, training goes on)
            tracker.off(f"{tracker.where or s.backend} could not start: {tracker.describe(e)}", step)
            return tracker
        tracker.backend = s.backend
        tracker.record({"event": "tracking", "step": step, "backend": s.backend, "run_id": tracker.run_id,
                        "run_name": tracker.run_name, "resumed": resume is not None})
        return tracker

    def resume_id(self, backend: str) -> str | None:
        """The run id a checkpoint's log carries (the last `tracking` event of this backend)."""
        import json

        for line in reversed(self.log.lines if self.log is not None else []):
            record = json.loads(line)
            if record.get("event") == "tracking" and record.get("backend") == backend:
                return record.get("run_id")
        return None

    def _start(self, cfg, s, run: dict, resume: str | None) -> None:
        if why := missing_package(s.backend):
            raise TrackingOff(why)
        params = {"stage": run["stage"], "target": run["target"], "arm": run["arm"], **run["params"]}
        tags = {**s.tags, "fusion_ray.stage": run["stage"], "fusion_ray.target": run["target"],
                "fusion_ray.arm": run["arm"]}
        if s.backend == "mlflow":
            self._start_mlflow(cfg, s, params, tags, resume)
        else:
            self._start_wandb(cfg, s, params, tags, resume)

    def _start_mlflow(self, cfg, s, params: dict, tags: dict, resume: str | None) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        uri = mlflow_uri(s, cfg.workdir)
        self.where = f"mlflow at {'$' + s.tracking_uri_env if s.tracking_uri_env else uri}"
        self.secret = s.tracking_uri_env
        # this worker process serves this run only: hold MLflow's HTTP client to the settings
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(s.timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(s.max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        if is_file_store(uri):  # MLflow 3 refuses its file store unless asked; the user asked for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line, not one per retry
        if resume:
            os.environ["MLFLOW_RUN_ID"] = resume  # mlflow.start_run resumes it (and clears the variable)
        kwargs = {"tracking_uri": uri, "experiment_name": s.experiment or cfg.name, "run_name": self.run_name,
                  "create_experiment_if_not_exists": True, "tags": tags, "rank_zero_only": True}
        try:
            mlflow = setup_mlflow(**kwargs)
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            mlflow = setup_mlflow(**kwargs)  # another arm created the experiment in between: use it
        self.run_id = mlflow.active_run().info.run_id
        if resume is None:  # a resumed run has them (and MLflow refuses a changed parameter)
            items = list({**flatten(cfg.to_dict(), "config"), **flatten(params)}.items())
            for i in range(0, len(items), PARAMS_PER_CALL):
                mlflow.log_params(dict(items[i:i + PARAMS_PER_CALL]))
        self._log_metrics = lambda metrics, step: mlflow.log_metrics(metrics, step=step)
        self._end = lambda ok: mlflow.end_run("FINISHED" if ok else "FAILED")

    def _start_wandb(self, cfg, s, params: dict, tags: dict, resume: str | None) -> None:
        import wandb
        from ray.air.integrations.wandb import setup_wandb

        os.environ["WANDB_MODE"] = s.mode  # before setup_wandb: offline needs no API key
        # W&B writes a `wandb/` dir below this one
        where = s.dir or (None if locations.is_remote(cfg.workdir) else str(Path(cfg.workdir).expanduser().absolute()))
        self.where = f"wandb ({s.mode}, project {s.experiment or cfg.name})"
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
        run = setup_wandb(config={"config": cfg.to_dict(), **params}, rank_zero_only=True,
                          project=s.experiment or cfg.name, entity=s.entity, name=self.run_name, group=cfg.name,
                          tags=[f"{k}:{v}" for k, v in tags.items()], dir=where, mode=s.mode,
                          id=resume, resume="allow" if resume else None,
                          settings=wandb.Settings(init_timeout=s.timeout_s * (s.max_retries + 1)))
        self.run_id = run.id
        self._log_metrics = lambda metrics, step: run.log(metrics, step=step)
        self._end = lambda ok: run.finish(exit_code=0 if ok else 1)

    def log_step(self, metrics: dict) -> None:
        """One optimizer step's numbers, at its step."""
        if self.backend is None:
            return
        step = int(metrics["step"])
        values = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}
        try:
            self._log_metrics(values, step)
        except Exception as e:  # noqa: BLE001
            self.off(f"{self.where or self.backend}: logging step {step} failed: {self.describe(e)}", step)

    def finish(self, ok: bool = True, step: int = 0) -> None:
        if self.backend is None:
            return
        try:
            self._end(ok)
        except Exception as e:  # noqa: BLE001
            self.off(f"closing the run failed: {self.describe(e)}", step)
        self.backend = None

    def describe(self, error: Exception) -> str:
        """The error's message, or only its type where the message may quote a secret URI."""
        if self.secret and not isinstance(error, TrackingOff):
            return f"{type(error).__name__} (its message is not shown: it may quote the URI in ${self.secret})"
        return str(error)

    def off(self, reason: str, step: int) -> None:
        """Tracking off for the rest of this run: one line on stderr, one event in the log."""
        reason = one_line(reason, 400)
        self.backend = None
        print(f"[train] {self.run_name}: tracking off, training goes on: {reason}", file=sys.stderr, flush=True)
        self.record({"event": "tracking_off", "step": step, "reason": reason})

    def record(self, event: dict) -> None:
        if self.log is not None:
            self.log.add(event)
