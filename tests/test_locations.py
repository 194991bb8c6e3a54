"""`fusion_ray.locations`: kinds of reference, object-store copies, the offline hub cache, and the
rule that only it imports the demo package."""

import ast
import json
import os
import shutil
from pathlib import Path

import pytest

from fusion_ray import locations

REPO = Path(__file__).resolve().parents[1]


def test_kinds(tmp_path):
    (tmp_path / "org").mkdir()
    assert locations.kind("demo:pivot") == "demo"
    assert locations.kind("s3://bucket/key") == "uri" and locations.kind("gs://b/k") == "uri"
    assert locations.kind("file:///tmp/x") == "local"
    assert locations.kind("openchat/openchat_3.5") == "hub"
    assert locations.kind("./openchat/openchat_3.5") == "local"
    assert locations.kind(str(tmp_path / "org")) == "local"
    with pytest.raises(locations.LocationError, match="unknown demo asset 'nope'"):
        locations.check("demo:nope")
    with pytest.raises(locations.LocationError, match="path does not exist: ./missing/dir"):
        locations.check("./missing/dir")


def test_the_demo_scheme_is_registered_by_the_demo_package_not_imported_by_the_library():
    """Every stage resolves `demo:` through `locations`, which knows only what `demo/scheme.py`
    registered; the package's `__init__` imports that module (so every process, Ray workers
    included, has it), and `fusion-ray demo` imports the demo runner. Nothing else imports demo."""
    allowed = {REPO / "fusion_ray" / "__init__.py": ["fusion_ray.demo"], REPO / "fusion_ray" / "cli.py":
               ["fusion_ray.demo.run"]}
    offenders, found = [], {}
    for path in sorted((REPO / "fusion_ray").rglob("*.py")):
        if "demo" in path.relative_to(REPO / "fusion_ray").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                if n == "fusion_ray.demo" or n.startswith("fusion_ray.demo."):
                    (found.setdefault(path, []) if path in allowed else offenders).append(
                        n if path in allowed else f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"import fusion_ray.demo outside the package init and the CLI: {offenders}"
    assert found == allowed
    assert locations.check("demo:pivot") == "demo:pivot"  # registered by importing fusion_ray
    with pytest.raises(locations.LocationError, match="unknown demo asset 'nope'"):
        locations.check("demo:nope")


@pytest.mark.timeout(120)
def test_object_store_copy_is_made_once_per_node_and_renewed_when_the_object_changes(s3_server, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("FUSION_RAY_CACHE", str(tmp_path / "cache"))
    bucket = s3_server("loc-copies")
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"vocab_size": 7}))
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    assert locations.upload(src, f"{bucket}/m") == 1000 + len((src / "config.json").read_bytes())
    assert [name for name, _, _ in locations.listing(f"{bucket}/m")] == ["config.json", "sub/w.bin"]
    assert locations.model_config(f"{bucket}/m") == {"vocab_size": 7}
    first = locations.local_dir(f"{bucket}/m")
    assert Path(first, "sub", "w.bin").read_bytes() == b"\0" * 1000
    assert str(tmp_path / "cache") in first
    stamp = Path(first, "config.json").stat().st_mtime_ns
    assert locations.local_dir(f"{bucket}/m") == first and Path(first, "config.json").stat().st_mtime_ns == stamp
    (src / "config.json").write_text(json.dumps({"vocab_size": 80}))  # the key: names, sizes, mtimes
    locations.upload(src / "config.json", f"{bucket}/m/config.json")
    second = locations.local_dir(f"{bucket}/m")
    assert second != first and json.loads(Path(second, "config.json").read_text()) == {"vocab_size": 80}
    one_file = locations.local_dir(f"{bucket}/m/config.json")
    assert Path(one_file).name == "config.json" and Path(one_file).is_file()
    assert not list((tmp_path / "cache" / "objects").glob("*.tmp-*"))
    with pytest.raises(locations.LocationError, match="nothing at s3://loc-copies/absent"):
        locations.local_dir(f"{bucket}/absent")
    assert locations.reachable(f"{bucket}/absent") == "model s3://loc-copies/absent: nothing at that location"
    assert locations.writable(f"{bucket}/run") is None
    assert "not writable" in locations.writable("s3://no-such-bucket-here/run")


def make_hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """Lay out an HF hub cache entry for `repo_id` by hand (refs/main → a snapshot of `files`)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(files, entry / "snapshots" / commit)
    return entry / "snapshots" / commit


def test_hub_ids_resolve_from_an_offline_cache_and_a_missing_one_is_named(tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 5}))
    snapshot = make_hub_cache(tmp_path / "hf", "someorg/tiny", files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert Path(locations.local_dir("someorg/tiny")) == snapshot
    assert locations.model_config("someorg/tiny") == {"model_type": "llama", "vocab_size": 5}
    assert locations.reachable("someorg/tiny") is None
    why = locations.reachable("someorg/absent")
    assert why is not None and "someorg/absent" in why and "offline" in why
    with pytest.raises(locations.LocationError, match="hub id someorg/absent not found in the offline HF cache"):
        locations.local_dir("someorg/absent")


def test_worker_env_forwards_store_and_hub_settings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = locations.worker_env()
    assert env["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"] and env["HF_HUB_OFFLINE"] == "1"
    assert "FUSION_RAY_CACHE" not in env  # each node keeps its own cache
