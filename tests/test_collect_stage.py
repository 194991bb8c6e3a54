"""The collect stage on a real local Ray with the `hf` engine: contract, exactness, resume, faults."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io, schema
from fusion_ray.collect import stage as collect
from fusion_ray.prepare import stage as prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
QUIET = lambda *_: None  # noqa: E731
# the fault tests: rows in shards of SHARD_ROWS, micro-batches of 2, so a kill lands part-way
ROWS, SHARD_ROWS = 240, 10
SHARDS = ROWS // SHARD_ROWS


@pytest.fixture(scope="module")
def setup(tiny_fused, ray_local):
    """The shared run (conftest's `tiny_fused`: the pivot and three sources on 24 rows), and
    configs of the pivot, gpt and mis over its corpora."""
    models, tmp = tiny_fused.models, tiny_fused.tmp

    def config(name: str, **sections):
        return make_config(tmp / name, models["pivot"], {"gpt": models["gpt"], "mis": models["mis"]},
                           tiny_fused.corpora, **sections)

    return {"cfg": tiny_fused.cfg, "config": config, "models": models, "ray": ray_local, "tmp": tmp}


def test_every_model_gets_every_row_once_in_order(setup):
    cfg = setup["cfg"]
    prepared = pq.read_table(cfg.stage_dir("prepare"))
    for model in cfg.models():
        out = cfg.stage_dir("collect", model.name)
        files = io.list_files(out)
        names = [f.rsplit("/", 1)[1] for f in files]
        assert names == [f.rsplit("/", 1)[1] for f in io.list_files(cfg.stage_dir("prepare"))]
        for f in files:
            schema.check_file(f, "logits")
        table = pq.read_table(out)
        assert table.column("sample_id").to_pylist() == prepared.column("sample_id").to_pylist()
        manifest = io.read_manifest(out)
        assert manifest["rows"] == {"in": 24, "out": 24}
        assert manifest["extra"]["top_k"] == 4


def test_rows_match_an_independent_transformers_forward(setup):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = setup["cfg"]
    row = pq.read_table(cfg.stage_dir("collect", "gpt")).slice(5, 1).to_pylist()[0]
    text = pq.read_table(cfg.stage_dir("prepare")).slice(5, 1).to_pylist()[0]
    tok = AutoTokenizer.from_pretrained(setup["models"]["gpt"])
    model = AutoModelForCausalLM.from_pretrained(setup["models"]["gpt"], dtype=torch.float32)
    ids = tok(text["text"])["input_ids"]
    assert row["input_ids"] == ids
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    top = torch.topk(logp[:-1], 4)
    assert row["topk_ids"] == top.indices.tolist()
    assert np.allclose(row["topk_logprobs"], top.values.detach().numpy(), atol=2e-3)  # fp16 storage
    gold = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].detach().numpy()
    assert np.allclose(row["gold_logprob"], gold, atol=1e-5)
    mask = np.array(row["loss_mask"])
    reply = text["text"][text["span_starts"][0]:text["span_ends"][0]]
    assert 0 < mask.sum() < len(mask)
    assert row["nll_sum"] == pytest.approx(-gold[mask].sum(), rel=1e-5)
    assert row["n_bytes"] == len(reply.encode())


def test_rerun_is_skipped_by_manifest(setup):
    result = collect.run(setup["cfg"], log=QUIET)
    statuses = {m: r.status for m, r in result.parts.items()}
    assert result.status == "skipped"
    assert statuses == {"pivot": "skipped", "gpt": "skipped", "mis": "skipped", "twin": "skipped"}


def test_bad_tokenizer_or_impossible_k_fails_before_any_work(setup, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(setup["models"]["gpt"], broken)
    (broken / "tokenizer.json").write_text("{")
    cfg = make_config(tmp_path / "w", setup["models"]["pivot"], {"gpt": broken}, [tmp_path])
    with pytest.raises(ValueError, match=f"model 'gpt': cannot load its tokenizer from {broken}"):
        collect.preflight(cfg)
    from fusion_ray.config import ConfigError

    with pytest.raises(ConfigError, match="top_k=1000 exceeds the vocabulary of model 'pivot'"):
        setup["config"]("bigk", collect={"top_k": 1000})  # a validation error, before any work
    assert not (tmp_path / "w").exists()


def test_killed_engine_actor_still_yields_every_row_exactly_once(setup):
    import psutil

    tmp = setup["tmp"]
    corpus = write_jsonl(tmp / "many.jsonl", chat_rows(ROWS))
    cfg = make_config(tmp / "kill", setup["models"]["pivot"], {"gpt": setup["models"]["gpt"]}, [corpus],
                      data={"shard_rows": SHARD_ROWS}, collect={"batch_size": 2})
    prepare.run(cfg, log=QUIET)
    partial = cfg.stage_dir("collect", "pivot") + ".partial"
    killed = {}

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not io.list_files(partial):
            time.sleep(0.02)
        for proc in psutil.process_iter(["cmdline"]):
            if "ScoreUDF" in " ".join(proc.info["cmdline"] or []):  # the engine actor's process
                os.kill(proc.pid, signal.SIGKILL)
                killed["shards_done"] = len(io.list_files(partial))
                return

    thread = threading.Thread(target=killer)
    thread.start()
    collect.collect_model(cfg, cfg.pivot, io.list_files(cfg.stage_dir("prepare")),
                           io.read_manifest(cfg.stage_dir("prepare"))["fingerprint"], log=QUIET)
    thread.join()
    assert 0 < killed.get("shards_done", 0) < SHARDS, killed  # killed mid-run
    ids = pq.read_table(cfg.stage_dir("collect", "pivot")).column("sample_id").to_pylist()
    assert ids == [f"computing-{i}" for i in range(ROWS)]


def test_interrupted_run_resumes_and_redoes_only_missing_shards(setup):
    tmp = setup["tmp"]
    corpus = write_jsonl(tmp / "resume.jsonl", chat_rows(ROWS))
    cfg = make_config(tmp / "resume", setup["models"]["pivot"], {"gpt": setup["models"]["gpt"]}, [corpus],
                      data={"shard_rows": SHARD_ROWS}, collect={"batch_size": 2})
    prepare.run(cfg, log=QUIET)
    cfg_file = tmp / "resume.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "RAY_ADDRESS": setup["ray"].get_runtime_context().gcs_address}
    code = ("from fusion_ray.config import load_config\nfrom fusion_ray.collect import stage\n"
            f"cfg = load_config({str(cfg_file)!r})\nstage.run(cfg)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = cfg.stage_dir("collect", "pivot") + ".partial"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not io.list_files(partial):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = {f: os.stat(f).st_mtime_ns for f in io.list_files(partial)}
    assert 0 < len(done) < SHARDS, "the run was interrupted part-way"
    assert not io.exists(cfg.stage_dir("collect", "pivot")), "nothing published before completion"
    time.sleep(2)  # let Ray reap the dead driver's actors
    collect.run(cfg, log=QUIET)
    final = cfg.stage_dir("collect", "pivot")
    for f, mtime in done.items():
        assert os.stat(f.replace(".partial", "")).st_mtime_ns == mtime, "finished shard was not redone"
    ids = pq.read_table(final).column("sample_id").to_pylist()
    assert ids == [f"computing-{i}" for i in range(ROWS)]
