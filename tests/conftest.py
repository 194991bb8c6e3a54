"""Shared test fixtures and the test tiers: one local Ray per session, tiny model factories.

Tiers (markers registered in pyproject.toml; `--strict-markers` is on):
- `integration`: starts Ray, an engine, a server or training. A test is put here automatically
  when it uses a fixture in `INTEGRATION_FIXTURES` (directly or through another fixture, e.g. a
  module fixture that asks for `ray_local`), or when it or its module carries the marker
  (`pytestmark = pytest.mark.integration`: tests that start their own `ray start` cluster or
  build the demo's trained models).
- `regression`: quality inequalities between trained arms (e.g. fused vs CLM-only bpb), with a
  tolerance taken from the seed spread that bench/quality.py measured. They are integration tests too.
- everything else is the unit tier: `make test-fast` (`pytest -m "not integration and not regression"`).
  A run that selects no integration test refuses `ray.init` (and so Ray Data / Train / Serve, which
  start Ray through it): a test that needs Ray but is not classified fails with a message saying so.
`make test` runs every tier.

Ray: loopback only, auth off, 4 logical CPUs on a 2-core machine (tests request
fractional CPUs), no dashboard; shut down at the end of the session. Every test
that touches Ray carries a timeout (pytest-timeout; the default in pyproject is
600 s, Ray tests set their own).
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("FUSION_RAY_CACHE", str(Path.home() / ".cache" / "fusion_ray"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-compatible test server's address is fixed before anything starts Ray, so every Ray
# worker inherits it; the server itself (`s3_server`) starts only for tests that ask for it.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


# Fixtures that start Ray, a server or an engine: any test that uses one (directly or through
# another fixture) is an integration test.
INTEGRATION_FIXTURES = frozenset({"ray_local", "s3_server"})


def is_integration(item: pytest.Item) -> bool:
    return bool(INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))) or (
        item.get_closest_marker("integration") is not None)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_integration(item) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


# Set when the run is the unit tier: Ray's temp root for this run (see `pytest_collection_finish`).
_UNIT_TIER_RAY_TMP: Path | None = None


def pytest_collection_finish(session):
    """A run without integration tests (the unit tier) must not start Ray.

    In this process `ray.init` raises (Ray Data, Train and Serve start Ray through it too); for
    subprocesses (the CLI tests), Ray's temp root points to an empty directory, and a test after
    which a Ray session appears there fails (`_unit_tier_starts_no_ray`).
    """
    global _UNIT_TIER_RAY_TMP
    if not session.items or any(is_integration(item) for item in session.items):
        return
    import tempfile

    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(UNIT_TIER_RAY)

    ray.init = refuse
    _UNIT_TIER_RAY_TMP = Path(tempfile.mkdtemp(prefix="fr-unit-"))
    os.environ["RAY_TMPDIR"] = str(_UNIT_TIER_RAY_TMP)


UNIT_TIER_RAY = ("a unit-tier test started Ray: use the `ray_local` fixture (which makes the test an integration "
                 "test) or mark it `pytest.mark.integration` (tests/conftest.py)")


@pytest.fixture(autouse=True)
def _unit_tier_starts_no_ray():
    yield
    if _UNIT_TIER_RAY_TMP is not None:
        sessions = list(_UNIT_TIER_RAY_TMP.glob("ray/session_*"))
        if sessions:
            shutil.rmtree(_UNIT_TIER_RAY_TMP / "ray", ignore_errors=True)
            pytest.fail(f"{UNIT_TIER_RAY}; a subprocess left {sessions[0]}", pytrace=False)


def pytest_sessionfinish(session):
    if _UNIT_TIER_RAY_TMP is not None:
        shutil.rmtree(_UNIT_TIER_RAY_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (loopback, auth off, 4 logical CPUs)."""
    from fusion_ray.config import RayConfig
    from fusion_ray.ray_env import init_ray

    shm_before = set(glob.glob("/dev/shm/psm_*"))
    ray = init_ray(RayConfig(num_cpus=4), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for leftover in set(glob.glob("/dev/shm/psm_*")) - shm_before:  # engines' shared memory
        Path(leftover).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: `tiny_models(arch, family, vocab_size=512, layers=1)` → an HF model dir.

    Builds a randomly initialised tiny causal LM with a real cut-down tokenizer
    and chat template; results are cached for the session.
    """
    from fusion_ray.demo.assets import TinyModel
    from fusion_ray.demo.build import make_model
    from fusion_ray.demo.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple, Path] = {}

    def make(
        arch: str = "qwen2",
        family: str = "gpt2",
        vocab_size: int = 512,
        layers: int = 1,
        seed: int = 0,
    ) -> Path:
        key = (arch, family, vocab_size, layers, seed)
        if key not in built:
            import torch

            out = root / "-".join(map(str, key))
            tokenizer = build_tokenizer(family, vocab_size, out)
            torch.manual_seed(seed)
            spec = TinyModel(
                name=out.name,
                architecture=arch,
                tokenizer=family,
                vocab_size=vocab_size,
                mix=(),
                steps=0,
                layers=layers,
            )
            make_model(spec, tokenizer).save_pretrained(out)
            built[key] = out
        return built[key]

    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_fused(tiny_models, tmp_path_factory, ray_local):
    """One explicit run, prepare → collect → align → fuse, shared by the stage tests that read it
    (collect, align/fuse, train, concurrency): the pivot (Qwen2 with the DeepSeek tokenizer) and
    three sources, GPT-2 and Mistral (other tokenizers) and `twin` (the pivot's own tokenizer), on
    14 computing and 10 English conversations; spans with the first-piece map.

    Tests that change a stage's output or settings work on a copy (`helpers.fused_copy`, or a
    copied workdir); `collected` is the collect stage's result (each model's start and end).
    """
    from types import SimpleNamespace

    from helpers import chat_rows, make_config, write_jsonl

    from fusion_ray.align import stage as align
    from fusion_ray.collect import stage as collect
    from fusion_ray.fuse import stage as fuse
    from fusion_ray.prepare import stage as prepare

    tmp = tmp_path_factory.mktemp("fused")
    corpora = [write_jsonl(tmp / "c.jsonl", chat_rows(14)), write_jsonl(tmp / "e.jsonl", chat_rows(10, "english"))]
    models = {"pivot": tiny_models("qwen2", "deepseek"), "gpt": tiny_models("gpt2", "gpt2"),
              "mis": tiny_models("mistral", "mistral"), "twin": tiny_models("qwen2", "deepseek", seed=1)}
    cfg = make_config(tmp / "w", models["pivot"], {n: models[n] for n in ("gpt", "mis", "twin")}, corpora,
                      align={"positions": "spans", "vocab_map": "first_piece"})
    cfg.data.train[0].domain, cfg.data.train[1].domain = "computing", "english"
    quiet = lambda *_: None  # noqa: E731
    prepare.run(cfg, log=quiet)
    collected = collect.run(cfg, log=quiet)
    align.run(cfg, log=quiet)
    fuse.run(cfg, log=quiet)
    return SimpleNamespace(cfg=cfg, models=models, corpora=corpora, collected=collected, tmp=tmp)


@pytest.fixture(scope="session")
def cli_project(tiny_models, tmp_path_factory):
    """A project outside the repo, every path of its `fusion.yaml` relative (`helpers.pipeline_config`),
    and the whole pipeline run on it by the CLI from its own directory, as a user would:
    `fusion-ray run fusion.yaml` (workdir `runs/rel`). Yields `(project dir, completed process)`.
    test_front_door checks the run and its failures; test_object_store_pipeline compares the same
    run on a bucket with its report. Ray's session files are below `helpers.CLI_RAY_TMP`."""
    import yaml
    from helpers import (
        CLI_RAY_TMP,
        PIPELINE_HELDOUT_ROWS,
        PIPELINE_TRAIN_ROWS,
        chat_rows,
        fusion_ray_cli,
        pipeline_config,
        write_jsonl,
    )

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_models("qwen2", "deepseek"), root / "models" / "pivot")
    shutil.copytree(tiny_models("gpt2", "gpt2"), root / "models" / "gpt")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", chat_rows(PIPELINE_TRAIN_ROWS))
    write_jsonl(root / "data" / "heldout.jsonl", chat_rows(PIPELINE_HELDOUT_ROWS, start=100))
    config = pipeline_config("runs/rel", "models/pivot", "models/gpt", "data/train.jsonl", "data/heldout.jsonl")
    (root / "fusion.yaml").write_text(yaml.safe_dump(config))
    yield root, fusion_ray_cli(root, "run", "fusion.yaml")
    shutil.rmtree(CLI_RAY_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback for the session.

    Yields a factory `bucket(name) -> "s3://name"` that creates a fresh bucket.
    """
    import socket
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.1)

    def bucket(name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    yield bucket
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_the_session_ray_free(request):
    """After each module, the session's Ray must get back every CPU it lent: an actor or a
    placement group a module forgets (an engine, a trainer) would starve every later module's
    work, which then waits for resources until its timeout. Fails the module's teardown,
    naming what is still held."""
    yield
    import ray

    if not ray.is_initialized():
        return
    import time

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 30  # actors and placement groups are torn down asynchronously
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    if free < total:
        from ray.util import placement_group_table

        alive = [f"{a.get('ActorClassName') or a.get('class_name')}" for a in _alive_actors()]
        groups = [g.get("name") or pg_id for pg_id, g in placement_group_table().items() if g.get("state") == "CREATED"]
        pytest.fail(f"{request.module.__name__} left {total - free:g} of {total:g} CPUs of the session's Ray held: "
                    f"actors {alive}, placement groups {groups}", pytrace=False)


def _alive_actors() -> list[dict]:
    import ray

    try:
        table = ray._private.state.actors()  # the GCS's actor table (no dashboard needed)
    except Exception:  # noqa: BLE001 - only for the failure message
        return []
    return [a for a in table.values() if a.get("State") in ("ALIVE", 2, "PENDING_CREATION")]
