"""`train.tracking`: its settings, and the rank-0 tracker on a real MLflow (a file store in a tmp dir,
no Ray). The tracked Ray Train runs themselves are read back in tests/test_train_stage.py."""

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from fusion_ray.config import ConfigError, TrackingConfig, TrainConfig, load_config
from fusion_ray.pipeline import check_stages
from fusion_ray.trainer.fit import result_fields
from fusion_ray.trainer.loop import TrainLog
from fusion_ray.trainer.tracking import Tracker, TrackingOff, flatten, mlflow_uri

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
RUN = {"run_name": "t-train-a", "stage": "train", "target": "a", "arm": "fused",
       "params": {"fingerprint": "f00d", "data_fingerprint.fused": "beef"}}


def tiny(*overrides: str):
    return load_config(TINY, list(overrides))


# --- settings ----------------------------------------------------------------------------------

def test_off_by_default_and_a_backend_name_is_short_for_the_section():
    assert TrainConfig().tracking.backend == "none"
    cfg = tiny("train.tracking=mlflow")
    assert cfg.train.tracking == TrackingConfig(backend="mlflow")
    cfg = tiny("train.tracking.backend=wandb", "train.tracking.mode=offline")
    assert (cfg.train.tracking.backend, cfg.train.tracking.mode) == ("wandb", "offline")


def test_the_wire_form_validates_again():
    """A worker validates the whole dumped config (every field set) again: it must stay valid."""
    for tracking in ({}, {"backend": "mlflow", "tracking_uri": "/tmp/m", "experiment": "e"},
                     {"backend": "wandb", "mode": "offline", "entity": "me"}):
        t = TrainConfig(tracking=tracking)
        assert TrainConfig.model_validate(t.model_dump(mode="json")) == t


ML = "train.tracking.backend=mlflow"


@pytest.mark.parametrize("overrides, needle", [
    (["train.tracking=mlflo"], "train.tracking.backend: Input should be 'none', 'mlflow' or 'wandb'"),
    (["train.tracking.tracking_uri=/tmp/m"], "train.tracking: tracking_uri set, but backend is none"),
    ([ML, "train.tracking.mode=offline"], "train.tracking: mode: not a setting of backend mlflow"),
    (["train.tracking.backend=wandb", "train.tracking.tracking_uri=/m"],
     "train.tracking: tracking_uri: not a setting of backend wandb"),
    ([ML, "train.tracking.tracking_uri=/m", "train.tracking.tracking_uri_env=MLURI"],
     "tracking_uri and tracking_uri_env both set"),
    ([ML, "train.tracking.tracking_uri_env=1BAD"], "train.tracking.tracking_uri_env: String"),
    ([ML, "train.tracking.timeout_s=0"], "train.tracking.timeout_s"),
    ([ML, "train.tracking.token=x"], "train.tracking.token: unknown key"),
])
def test_bad_settings_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        tiny(*overrides)
    assert needle in "\n".join(err.value.errors), err.value.errors


@pytest.mark.parametrize("uri", ["http://alice:s3cr3t@mlflow.example:5000",
                                 "https://mlflow.example/?access_token=s3cr3t",
                                 "https://s3cr3t@mlflow.example"])
def test_a_uri_with_credentials_is_refused_without_showing_them(uri):
    with pytest.raises(ConfigError) as err:
        tiny("train.tracking.backend=mlflow", f"train.tracking.tracking_uri={uri}")
    text = "\n".join(err.value.errors)
    assert "train.tracking: tracking_uri must not carry credentials" in text and "s3cr3t" not in text


def test_tracking_changes_no_fingerprint():
    plain, tracked = tiny(), tiny("train.tracking.backend=mlflow", "train.tracking.experiment=x")
    assert result_fields(plain) == result_fields(tracked)


@pytest.mark.parametrize("backend, package", [("mlflow", "mlflow-skinny"), ("wandb", "wandb")])
def test_a_missing_package_fails_before_training(backend, package, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # what Python does for a module it cannot import
    cfg = tiny(f"train.tracking={backend}")
    with pytest.raises(ValueError, match=rf"train.tracking: backend {backend} needs the {package} package"):
        check_stages(cfg, ["fuse", "train"])
    check_stages(cfg, ["prepare", "collect"])  # no training stage: nothing to track


def test_flatten_names_every_leaf_and_cuts_long_values():
    flat = flatten({"a": {"b": 1, "c": [{"d": None}, "e"], "f": []}, "g": "x" * 7000})
    assert flat == {"a.b": "1", "a.c.0.d": "", "a.c.1": "e", "a.f": "[]", "g": "x" * 5999 + "…"}


def test_the_tracking_uri_resolution_order(monkeypatch, tmp_path):
    s = TrackingConfig(backend="mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_uri(s, str(tmp_path / "w")) == str(tmp_path / "w" / "mlruns")
    with pytest.raises(TrackingOff, match="no tracking URI"):
        mlflow_uri(s, "s3://bucket/w")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert mlflow_uri(s, "s3://bucket/w") == "http://env:5000"
    assert mlflow_uri(TrackingConfig(backend="mlflow", tracking_uri="/m"), "w") == "/m"
    named = TrackingConfig(backend="mlflow", tracking_uri_env="FR_TEST_MLURI")
    with pytest.raises(TrackingOff, match="FR_TEST_MLURI"):
        mlflow_uri(named, "w")
    monkeypatch.setenv("FR_TEST_MLURI", "https://secret.example")
    assert mlflow_uri(named, "w") == "https://secret.example"


# --- the tracker on a real MLflow ----------------------------------------------------------------

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(name, "0")  # the tracker sets them; monkeypatch puts them back
        monkeypatch.delenv(name)
    yield str(tmp_path / "mlruns")
    import mlflow

    mlflow.end_run()


def config(store: str, tmp_path, **tracking):
    return tiny(f"workdir={tmp_path / 'w'}", "train.tracking.backend=mlflow", f"train.tracking.tracking_uri={store}",
                *(f"train.tracking.{k}={v}" for k, v in tracking.items()))


def test_a_restarted_run_goes_on_in_the_same_mlflow_run(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    cfg = config(mlflow_store, tmp_path, experiment="exp", **{"tags.team": "fusion"})
    log = TrainLog(str(tmp_path / "log.jsonl"))
    first = Tracker.start(cfg, RUN, 0, log)
    for step in (1, 2, 3):
        first.log_step({"step": step, "loss": 1 / step, "lr": 0.1 * step, "tokens_per_s": 100.0 + step})
    first.finish(ok=False, step=3)  # the worker died: this process holds no active run any more
    # a restart from the step-2 checkpoint: the log the checkpoint carries names the run
    saved = [line for line in log.lines if json.loads(line).get("step", 0) <= 2]
    second = Tracker.start(cfg, RUN, 0, TrainLog(log.path, saved), step=2)
    assert second.run_id == first.run_id
    for step in (3, 4):
        second.log_step({"step": step, "loss": 10.0 * step, "lr": 0.5, "tokens_per_s": 7.0})
    second.finish(step=4)

    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "t-train-a" and runs[0].info.status == "FINISHED"
    losses = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(losses) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (3, 30.0), (4, 40.0)]
    params, tags = runs[0].data.params, runs[0].data.tags
    assert params["fingerprint"] == "f00d" and params["data_fingerprint.fused"] == "beef"
    assert params["config.name"] == cfg.name and params["config.train.tracking.experiment"] == "exp"
    assert params["config.sources.1.name"] == cfg.sources[1].name
    assert tags["team"] == "fusion" and tags["fusion_ray.arm"] == "fused"
    events = [json.loads(line) for line in log.lines if "event" in json.loads(line)]
    assert events == [{"event": "tracking", "step": 0, "backend": "mlflow", "run_id": first.run_id,
                       "run_name": "t-train-a", "resumed": False}]


def test_other_ranks_and_a_disabled_backend_open_no_run(mlflow_store, tmp_path):
    cfg = config(mlflow_store, tmp_path)
    log = TrainLog(str(tmp_path / "log.jsonl"))
    assert Tracker.start(cfg, RUN, 1, None).backend is None
    assert Tracker.start(tiny(), RUN, 0, log).backend is None
    assert not Path(mlflow_store).exists() and log.lines == []


def test_an_unanswering_server_costs_one_bounded_wait_and_one_line(mlflow_store, tmp_path, capfd):
    with socket.socket() as server:  # accepts connections (the kernel's backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        cfg = config(mlflow_store, tmp_path, tracking_uri=f"http://127.0.0.1:{port}", timeout_s=1, max_retries=1)
        log = TrainLog(str(tmp_path / "log.jsonl"))
        capfd.readouterr()
        started = time.monotonic()
        tracker = Tracker.start(cfg, RUN, 0, log)
        waited = time.monotonic() - started
        tracker.log_step({"step": 1, "loss": 1.0})  # off: nothing sent, nothing printed
        tracker.finish(step=1)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "tracking off" in line]
    assert len(lines) == 1 and lines[0].startswith("[train] t-train-a: tracking off, training goes on: "), err
    assert f"mlflow at http://127.0.0.1:{port} could not start" in lines[0]
    assert waited < 1 * (1 + 1) + 5, "timeout_s × (max_retries + 1), plus importing mlflow"
    events = [json.loads(line) for line in log.lines]
    assert [e["event"] for e in events] == ["tracking_off"] and events[0]["step"] == 0


def test_a_uri_from_the_environment_stays_out_of_the_warning(mlflow_store, tmp_path, capfd, monkeypatch):
    with socket.socket() as probe:  # a free port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("FR_TEST_MLURI", f"http://127.0.0.1:{port}/t0ken-path")
    cfg = tiny(f"workdir={tmp_path / 'w'}", ML, "train.tracking.tracking_uri_env=FR_TEST_MLURI",
               "train.tracking.max_retries=0")
    log = TrainLog(str(tmp_path / "log.jsonl"))
    assert Tracker.start(cfg, RUN, 0, log).backend is None
    text = capfd.readouterr().err + log.text()
    assert "mlflow at $FR_TEST_MLURI could not start" in text and "t0ken" not in text and str(port) not in text
