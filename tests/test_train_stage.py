"""The train stage: Ray Train with DDP and DeepSpeed ZeRO on gloo, one target per source plus the CLM-only arm."""

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import fused_copy

from fusion_ray import io
from fusion_ray.train import stage as trainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
QUIET = lambda *_: None  # noqa: E731


TRAIN = {"strategy": "ddp", "num_workers": 2, "cpus_per_worker": 0.5, "global_batch_size": 8,
         "micro_batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "lr": 1e-3,
         "lambda_clm": 0.5, "clm_only_arm": True, "bf16": False}


@pytest.fixture(scope="module")
def fused(tiny_fused, tmp_path_factory):
    """The shared run's fused data of the gpt source (conftest's `tiny_fused`, 24 rows) in a workdir
    of this module, trained with `TRAIN`."""
    return fused_copy(tiny_fused.cfg, tmp_path_factory.mktemp("train") / "w", **TRAIN)


@contextlib.contextmanager
def silent_server():
    """A loopback port whose connections are accepted (by the kernel's backlog) and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def steps_logged(path) -> list[dict]:
    return [r for r in map(json.loads, open(path)) if "loss" in r]


@pytest.fixture(scope="module")
def trained(fused, tmp_path_factory):
    """Both arms trained, each tracked in MLflow (a file store in a tmp dir)."""
    cfg = fused.model_copy(deep=True)
    cfg.train.tracking = {"backend": "mlflow", "tracking_uri": str(tmp_path_factory.mktemp("mlruns"))}
    return cfg, trainer.run(cfg, log=QUIET)


def test_targets_are_hf_chat_models_that_moved_from_the_pivot(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result = trained
    assert set(result.parts) == {"gpt", "clm_only"}
    pivot = AutoModelForCausalLM.from_pretrained(cfg.pivot.path)
    for name in ("gpt", "clm_only"):
        path = cfg.stage_dir("train", name)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.chat_template and tok.pad_token_id is not None
        delta = sum((a - b).abs().sum() for a, b in zip(model.parameters(), pivot.parameters()))
        assert delta > 0, "training changed the weights"
        ids = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True), return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()


def test_metrics_log_and_manifest(trained):
    cfg, _ = trained
    fused = io.read_manifest(cfg.stage_dir("train", "gpt"))
    clm = io.read_manifest(cfg.stage_dir("train", "clm_only"))
    assert fused["extra"]["metrics"]["step"] == 4 and fused["extra"]["lambda_clm"] == 0.5
    assert clm["extra"]["lambda_clm"] == 1.0 and clm["extra"]["metrics"]["clm"] > 0
    assert not {"fusion", "transferred"} & set(clm["extra"]["metrics"]), "CLM alone: no fusion term, no transfer"
    assert (fused["extra"]["objective"], clm["extra"]["objective"]) == ("fusion", "clm")
    log = steps_logged(f"{cfg.stage_dir('train', 'gpt')}/train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["fusion"] > 0 and 0 <= r["transferred"] <= 1 and r["tokens_per_s"] > 0 for r in log)
    lrs = [r["lr"] for r in log]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0], "cosine decay after a 1-step warmup"


def test_each_arm_is_one_mlflow_run_with_every_step_and_the_fingerprints(trained, monkeypatch):
    from mlflow import MlflowClient

    cfg, _ = trained
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(cfg.train.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)  # the experiment defaults to the config's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"test-train-gpt", "test-train-clm_only"}, "one run per arm, `<name>-<stage>-<target>`"
    fused_fp = io.read_manifest(cfg.stage_dir("fuse", "gpt"))["fingerprint"]
    for name, run in runs.items():
        target = name.removeprefix("test-train-")
        path = cfg.stage_dir("train", target)
        assert run.info.status == "FINISHED"
        logged = steps_logged(f"{path}/train_log.jsonl")
        fusion_terms = ("fusion", "transferred") if target == "gpt" else ()  # CLM alone has neither
        for key in ("loss", "clm", *fusion_terms, "lr", "tokens_per_s"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2, 3, 4], (key, history)  # one value per optimizer step
            assert [m.value for m in history] == pytest.approx([r[key] for r in logged], rel=1e-6), key
        if not fusion_terms:
            assert client.get_metric_history(run.info.run_id, "fusion") == []
        params = run.data.params
        assert params["fingerprint"] == io.read_manifest(path)["fingerprint"]
        assert params["data_fingerprint.fused"] == fused_fp
        assert params["config.train.lr"] == str(cfg.train.lr) and params["config.sources.0.name"] == "gpt"
        assert params["arm"] == ("fused" if target == "gpt" else "clm_only")
        assert run.data.tags["fusion_ray.target"] == target
        events = [r for r in map(json.loads, open(f"{path}/train_log.jsonl")) if r.get("event") == "tracking"]
        assert [e["run_id"] for e in events] == [run.info.run_id], "the log names the run it went to"
    assert client.get_metric_history(runs["test-train-gpt"].info.run_id, "fusion")[0].value > 0.0


def test_finished_targets_are_skipped(trained):
    cfg, _ = trained
    statuses = {n: r.status for n, r in trainer.run(cfg, log=QUIET).parts.items()}
    assert statuses == {"gpt": "skipped", "clm_only": "skipped"}


@pytest.mark.parametrize("zero_stage, bf16, offload", [(2, True, False), (3, False, True)])
def test_deepspeed_zero_on_gloo_trains_a_loadable_target(fused, tmp_path, zero_stage, bf16, offload):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = fused_copy(fused, tmp_path / "w", strategy="deepspeed", zero_stage=zero_stage, bf16=bf16,
                  offload_optimizer=offload, clm_only_arm=False)
    with silent_server() as port:
        if zero_stage == 3:  # tracking to a server that accepts and never answers: training goes on
            cfg.train.tracking = {"backend": "mlflow", "tracking_uri": f"http://127.0.0.1:{port}",
                                  "timeout_s": 1, "max_retries": 0}
        result = trainer.run(cfg, log=QUIET)
    path = cfg.stage_dir("train", "gpt")
    assert result.parts["gpt"].status == "done"
    if zero_stage == 3:
        events = [r for r in map(json.loads, open(f"{path}/train_log.jsonl")) if "event" in r]
        assert len(events) == 1 and events[0]["event"] == "tracking_off", events
        assert f"mlflow at http://127.0.0.1:{port} could not start" in events[0]["reason"]
    manifest = io.read_manifest(path)
    assert manifest["extra"]["strategy"] == "deepspeed" and manifest["extra"]["metrics"]["step"] == 4
    log = steps_logged(f"{path}/train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["strategy"] == "deepspeed" for r in log)
    assert all(r["fusion"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # Every rank's ZeRO partition went into the Ray checkpoint (2 workers → 2 optimizer shards).
    shards = list(Path(manifest["extra"]["checkpoint"]).glob("ds/ds/*optim_states.pt"))
    assert len(shards) == 2, shards
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert next(model.parameters()).dtype == torch.float32, "the target holds the float32 master weights"
    pivot = AutoModelForCausalLM.from_pretrained(cfg.pivot.path)
    moved = sum((a - b).abs().sum() for a, b in zip(model.parameters(), pivot.parameters()))
    assert moved > 0 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_killed_worker_resumes_from_the_last_checkpoint(fused, tmp_path, strategy):
    import psutil

    cfg = fused_copy(fused, tmp_path / "w", strategy=strategy, max_steps=6, checkpoint_every=2, max_failures=1,
                  clm_only_arm=False)
    storage = Path(cfg.workdir) / "_ray_train"
    killed = {}

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if list(storage.glob("*/checkpoint_manager_snapshot.json")):  # Ray Train registered a checkpoint
                for proc in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed["pid"] = proc.pid
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    result = trainer.run(cfg, log=QUIET)
    thread.join()
    assert "pid" in killed, "no worker was killed"
    assert result.parts["gpt"].figures["metrics"]["step"] == 6
    lines = [json.loads(line) for line in open(f"{cfg.stage_dir('train', 'gpt')}/train_log.jsonl")]
    restarts = [r for r in lines if r.get("event") == "restarted"]
    assert len(restarts) == 1 and restarts[0]["step"] in (2, 4) and restarts[0]["checkpoint"], lines
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6], "each step logged once"


def test_checkpoint_of_another_config_is_refused_naming_both_hashes(trained, tmp_path):
    cfg, result = trained
    checkpoint = io.read_manifest(cfg.stage_dir("train", "gpt"))["extra"]["checkpoint"]
    other = fused_copy(cfg, tmp_path / "w", lr=5e-4, resume_from=checkpoint, clm_only_arm=False)
    with pytest.raises(ValueError, match=r"config hash \w+, but this run's config hash is \w+"):
        trainer.run(other, log=QUIET)
    assert not Path(other.stage_dir("train", "gpt")).exists()


def test_fused_data_for_another_vocabulary_fails_naming_both_sizes(trained, tmp_path):
    import shutil

    cfg, _ = trained
    bad = cfg.model_copy(deep=True)
    bad.workdir = str(tmp_path / "w")
    shutil.copytree(cfg.stage_dir("fuse", "gpt"), bad.stage_dir("fuse", "gpt"))
    path = f"{bad.stage_dir('fuse', 'gpt')}/_manifest.json"
    manifest = json.loads(open(path).read())
    assert manifest["extra"]["pivot_vocab"] == 515
    manifest["extra"]["pivot_vocab"] = 32000
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(ValueError, match="pivot vocabulary of 32000 tokens, but the model .* embedding of 515"):
        trainer.train_arm(bad, "gpt", "fused", "gpt", log=QUIET)
    assert not (tmp_path / "w" / "targets").exists()


def test_lora_target_is_an_adapter_on_the_pivot_with_its_dense_weights(fused, tmp_path):
    """train.peft on DeepSpeed ZeRO-3 (2 gloo workers; the base built partitioned): only the adapters
    moved, the target is an adapter dir naming the pivot, and merged/ holds base + adapter as peft's
    own merge computes it."""
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = fused_copy(fused, tmp_path / "w", strategy="deepspeed", zero_stage=3, clm_only_arm=False, max_steps=2,
                  peft={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "save_merged": True})
    assert trainer.run(cfg, log=QUIET).parts["gpt"].status == "done"
    path = Path(cfg.stage_dir("train", "gpt"))
    assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists()
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(cfg.pivot.path).resolve()) and adapter["r"] == 4
    factors = load_file(str(path / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in factors.items()), "B left zero: nothing trained"
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert [r["step"] for r in steps_logged(path / "train_log.jsonl")] == [1, 2]
    pivot = AutoModelForCausalLM.from_pretrained(cfg.pivot.path, dtype=torch.float32)
    oracle = peft.PeftModel.from_pretrained(pivot, str(path)).merge_and_unload().state_dict()
    dense = AutoModelForCausalLM.from_pretrained(path / "merged", dtype=torch.float32).state_dict()
    base = load_file(str(Path(cfg.pivot.path) / "model.safetensors"))
    changed = set()
    for name, want in oracle.items():
        torch.testing.assert_close(dense[name], want, rtol=0, atol=1e-6, msg=name)
        if name in base and not torch.equal(base[name], want):
            changed.add(name.rsplit(".", 2)[-2])
    assert changed == {"q_proj", "v_proj"}
    assert AutoTokenizer.from_pretrained(path / "merged").chat_template
    # the merge stage takes the adapter target as it is: the same merge as of its dense weights
    from fusion_ray.merge import engine
    from fusion_ray.merge import stage as merger
    from fusion_ray.merge.actor import spec_from_config

    merger.run(cfg, log=QUIET)
    want = engine.run_merge(spec_from_config(cfg.merge, cfg.pivot.path, [str(path / "merged")]), str(tmp_path / "m"))
    got = load_file(str(Path(cfg.stage_dir("merge")) / "model.safetensors"))
    for name, tensor in load_file(str(Path(want["dir"]) / "model.safetensors")).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_packed_rows_train_under_deepspeed_bf16_for_the_steps_their_packing_gives(fused, tmp_path):
    """The loop with packing: the plan's token counts cross to the workers, each micro-step is one packed
    row per rank (the 4D mask in the engine's bf16), and the run takes the steps its packing gives."""
    import numpy as np
    import pyarrow.parquet as pq

    from fusion_ray.trainer.order import RowPlan, fill_order, rank_batches

    cfg = fused_copy(fused, tmp_path / "w", strategy="deepspeed", bf16=True, packing=True, max_steps=None, epochs=1,
                  micro_batch_size=1, global_batch_size=2, clm_only_arm=False)
    cfg.data.max_length = 240  # rows of ~60 tokens: about 4 to a packed row
    data = cfg.stage_dir("fuse", "gpt")
    # expected: the epoch's stream (unpacked order, world 1; one window), regrouped by the fill order, next
    # fit into 240-token rows, ⌊packed / 2⌋ steps
    lengths = {r["sample_id"]: len(r["input_ids"]) for r in pq.read_table(data).to_pylist()}
    plan = RowPlan.of(data, cfg.train.seed, True, cfg.train.shuffle_window_rows)
    assert len(plan.windows(0)) == 1
    stream = np.array([lengths[t.column("sample_id")[0].as_py()] for t in rank_batches(plan, 0, 1, 0, 1)])
    packed, used = 0, cfg.data.max_length
    for n in np.minimum(stream[fill_order(stream, cfg.data.max_length)], cfg.data.max_length).tolist():
        packed, used = (packed + 1, n) if used + n > cfg.data.max_length else (packed, used + n)
    assert 2 <= packed < len(lengths) // 2, "conversations share packed rows"
    result = trainer.run(cfg, log=QUIET)
    assert result.parts["gpt"].status == "done"
    log = steps_logged(f"{cfg.stage_dir('train', 'gpt')}/train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, packed // 2 + 1))
    assert all(np.isfinite(r["loss"]) and r["fusion"] > 0 for r in log)
