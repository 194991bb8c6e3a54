"""Model dirs and safetensors files that lie, and OUT_DIRs that are not ours: refused in one line.

Every hostile input is built here from a tiny model. The header reader is fuzzed with
hypothesis (arbitrary bytes, arbitrary JSON, near-valid layouts) and checked against the
safetensors library as an oracle.
"""

import fcntl
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

from fusion_ray.checkpoint.streaming import ST_DTYPES, Checkpoint, CheckpointError, parse_header, read_header
from fusion_ray.merge import engine
from fusion_ray.merge.actor import merge_standalone
from tests.test_merge_engine import finetune, spec, weights

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """A base, a fine-tune (single file) and a sharded fine-tune of one tiny Qwen2."""
    root = tmp_path_factory.mktemp("hostile")
    base = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    return base, finetune(base, root / "ft1", 1), finetune(base, root / "ft2", 2, shard="60KB")


def raw_file(path: Path, header, data: bytes | int = b"", length: int | None = None) -> Path:
    """A safetensors-like file: 8-byte length (default: the header's), header (dict → JSON), data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = bytes(data) if isinstance(data, int) else data
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(begin: int, end: int, shape: list[int], dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_index(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def first_shard(model_dir: Path) -> str:
    return sorted(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values())[0]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text
    return text


# --- files named outside the model dir ----------------------------------------------------------


def test_index_naming_an_absolute_path_is_refused(models, tmp_path):
    _, ft1, ft2 = models
    liar = copy_model(ft2, tmp_path / "liar")
    shard = first_shard(liar)
    rewrite_index(liar, lambda wm: wm.update({k: str(ft1 / "model.safetensors") for k, v in wm.items() if v == shard}))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(liar))
    msg = one_line(err.value)
    assert "model.safetensors.index.json" in msg and str(ft1 / "model.safetensors") in msg and "outside" in msg


def test_index_naming_dotdot_is_refused(models, tmp_path):
    _, ft1, ft2 = models
    shutil.copytree(ft1, tmp_path / "victim")
    liar = copy_model(ft2, tmp_path / "liar")
    rewrite_index(liar, lambda wm: wm.update({k: "../victim/model.safetensors" for k in wm}))
    with pytest.raises(CheckpointError, match=r"index\.json: names '\.\./victim/model\.safetensors'.*outside"):
        Checkpoint(str(liar))
    rewrite_index(liar, lambda wm: wm.update({k: "sub/../../victim/model.safetensors" for k in wm}))
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint(str(liar))


def test_index_naming_a_system_file_is_refused(models, tmp_path):
    liar = copy_model(models[2], tmp_path / "liar")
    rewrite_index(liar, lambda wm: wm.update({k: "/proc/self/mem" for k in wm}))
    with pytest.raises(CheckpointError, match="outside the model dir"):
        Checkpoint(str(liar))


def test_symlinks_leaving_the_dir_are_refused_inside_ones_are_fine(models, tmp_path):
    base, ft1, ft2 = models
    single = copy_model(base, tmp_path / "single")
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").symlink_to(ft1 / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"single/model\.safetensors is a symlink leading outside"):
        Checkpoint(str(single))
    sharded = copy_model(ft2, tmp_path / "sharded")
    shard = first_shard(sharded)
    (sharded / shard).unlink()
    (sharded / shard).symlink_to(ft1 / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"index.json: names '{shard}', which is a symlink leading outside"):
        Checkpoint(str(sharded))
    # a symlink whose own target is inside the dir loads
    inside = copy_model(ft1, tmp_path / "inside")
    (inside / "weights").mkdir()
    (inside / "model.safetensors").rename(inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to("weights/real.safetensors")
    ck = Checkpoint(str(inside))
    want = load_file(str(ft1 / "model.safetensors"))
    assert ck.tensors.keys() == want.keys()
    assert all(torch.equal(ck.read(n), want[n]) for n in want)


def test_config_and_tokenizer_symlinks_leaving_the_dir_are_refused(models, tmp_path):
    base, ft1, _ = models
    secret = tmp_path / "secret.json"
    secret.write_text('{"tokens": "not yours"}')
    pivot = copy_model(base, tmp_path / "pivot")
    (pivot / "tokenizer.json").unlink()
    (pivot / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="pivot/tokenizer.json is a symlink leading outside"):
        engine.run_merge(spec(pivot, [pivot, ft1], "linear", parameters={"weight": 1.0}), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    listed = copy_model(base, tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: a JSON list, not an object"):
        engine.read_config(str(listed))


def hf_cache_snapshot(src: Path, root: Path, repo: str = "models--org--tiny") -> Path:
    """`src` laid out as the HF hub cache does: snapshots/<rev>/<file> → ../../blobs/<sha>."""
    blobs, snap = root / repo / "blobs", root / repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        shutil.copy2(f, blobs / f"{i:040x}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"{i:040x}"))
    return snap


def test_hf_cache_snapshot_with_symlinked_blobs_loads_and_merges(models, tmp_path):
    base, ft1, ft2 = models
    snap = hf_cache_snapshot(ft2, tmp_path / "hub")
    assert (snap / first_shard(snap)).is_symlink()
    ck, want = Checkpoint(str(snap)), weights(ft2)
    assert ck.tensors.keys() == want.keys()
    assert all(torch.equal(ck.read(n), want[n]) for n in want)
    for model, out in ((snap, "out"), (ft2, "plain")):
        engine.run_merge(spec(base, [ft1, model], "ties", parameters={"weight": 0.5, "density": 0.5}),
                         str(tmp_path / out))
    got, plain = weights(tmp_path / "out"), weights(tmp_path / "plain")
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    assert any(not torch.equal(got[k], want[k]) for k in want)
    # a snapshot symlink into ANOTHER repo's blobs leaves this repo: refused
    other = hf_cache_snapshot(ft1, tmp_path / "hub", repo="models--org--other")
    target = os.readlink(other / "model.safetensors")
    (snap / first_shard(snap)).unlink()
    (snap / first_shard(snap)).symlink_to(Path("..", "..", "..", "models--org--other", "blobs", Path(target).name))
    with pytest.raises(CheckpointError, match="symlink leading outside"):
        Checkpoint(str(snap))


# --- the index ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index, needle", [
    ("[1, 2]", "not an index"),
    ('{"weight_map": ["a"]}', "not an index"),
    ('{"weight_map": {"a": 3}}', "not an index"),
    ('{"weight_map": {}}', "not an index"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "duplicate key 'a'"),
    ('{"weight_map": {"a": "missing.safetensors"}}', "'missing.safetensors', which is not a file"),
    ("{\"weight_map\": ", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_malformed_index_is_refused(models, tmp_path, index, needle):
    liar = copy_model(models[2], tmp_path / "liar")
    path = liar / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(liar))
    assert str(path) in one_line(err.value) and needle in str(err.value)


def test_huge_index_is_refused_before_reading(models, tmp_path):
    liar = copy_model(models[2], tmp_path / "liar")
    with open(liar / "model.safetensors.index.json", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="byte limit for index"):
            Checkpoint(str(liar))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_index_and_shards_must_agree(models, tmp_path):
    ft2 = models[2]
    liar = copy_model(ft2, tmp_path / "liar")
    names = sorted(set(json.loads((liar / "model.safetensors.index.json").read_text())["weight_map"].values()))
    wm = json.loads((liar / "model.safetensors.index.json").read_text())["weight_map"]
    moved = next(k for k, v in wm.items() if v == names[0])
    rewrite_index(liar, lambda m: m.update({moved: names[1]}))
    with pytest.raises(CheckpointError, match=f"maps tensor '{moved}' to '{names[1]}', which does not hold it"):
        Checkpoint(str(liar))
    # the same tensor in two shards: both files named
    dup = copy_model(ft2, tmp_path / "dup")
    a, b = load_file(str(dup / names[0])), load_file(str(dup / names[1]))
    b[moved] = a[moved]
    save_file(b, str(dup / names[1]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(dup))
    msg = one_line(err.value)
    assert f"tensor '{moved}' is in both" in msg and names[0] in msg and names[1] in msg


# --- safetensors headers -------------------------------------------------------------------------


@pytest.mark.parametrize("header, data, needle", [
    ({"b": f32(32, 96, [16]), "a": f32(0, 64, [16])}, 96,
     "tensor 'b': data_offsets [32, 96] overlap 'a' [0, 64]"),
    ({"a": f32(0, 16, [4]), "b": f32(16, 32, [4], "Q7")}, 32, "tensor 'b': unknown dtype 'Q7'"),
    ({"a": f32(0, 16, [4]), "b": f32(16, 10**12, [4])}, 32, "tensor 'b': data_offsets [16, 1000000000000] exceed"),
    ({"a": f32(0, 16, [4]), "b": f32(16, 24, [4])}, 24, "tensor 'b': shape [4] of F32 is 16 bytes but data_offsets"),
    ({"a": f32(0, 16, [4]), "b": f32(20, 36, [4])}, 36, "tensor 'b': bytes [16, 20) of the data section"),
    ({"a": f32(0, 16, [4])}, 20, "4 bytes after the last tensor's data"),
    ({"a": f32(16, 0, [0])}, 16, "tensor 'a': data_offsets [16, 0] are not 0 ≤ begin ≤ end"),
    ({"a": f32(0, 16, [-4])}, 16, "shape must be a list of non-negative integers"),
    ({"a": f32(0, 16, [4.0])}, 16, "shape must be a list of non-negative integers"),
    ({"a": f32(0, 4, [True])}, 4, "shape must be a list of non-negative integers"),
    ({"a": f32(0, 0, [2**62, 2**62, 0])}, 0, "overflows a tensor size"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, 16, "data_offsets must be [begin, end]"),
    ({"a": 5}, 0, "tensor 'a': entry is a JSON int"),
    ({"__metadata__": {"format": 1}, "a": f32(0, 16, [4])}, 16, "__metadata__ must map strings to strings"),
    ([1, 2], 0, "header is a JSON list, not an object"),
    (b'{"a": NaN}', 0, "non-standard JSON constant NaN"),
    (b'{"a": {}, "a": {}}', 0, "duplicate key 'a'"),
    (b"[" * 100_000, 0, "header"),
    (b"{\xff}", 0, "header is not UTF-8"),
])
def test_lying_headers_are_refused_in_one_line(tmp_path, header, data, needle):
    path = raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        read_header(str(path))
    msg = one_line(err.value)
    assert msg.startswith(str(path)) and needle in msg
    with pytest.raises(Exception) as lib:  # the safetensors library refuses them too
        st_load(path.read_bytes())
    assert "Error" in type(lib.value).__name__


def test_huge_header_length_is_refused_fast_without_allocating(tmp_path):
    path = raw_file(tmp_path / "model.safetensors", b"{}", length=2**40)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(CheckpointError, match="header length 1099511627776 exceeds the 100000000-byte limit"):
            read_header(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1 and peak < 2**20
    raw_file(path, b"{}", length=1000)  # within the bound but past the end of the file
    with pytest.raises(CheckpointError, match="header length 1000 exceeds the file"):
        read_header(str(path))
    path.write_bytes(b"\x02\x00")
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        read_header(str(path))


def test_truncated_model_is_refused_before_any_read(models, tmp_path):
    liar = copy_model(models[1], tmp_path / "liar")
    path = liar / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"exceed the data section \(\d+ bytes\): truncated\?"):
        Checkpoint(str(liar))


def test_read_refuses_a_file_changed_after_validation(models, tmp_path):
    model = copy_model(models[1], tmp_path / "m")
    ck = Checkpoint(str(model))
    last = max(ck.tensors, key=lambda n: ck.tensors[n].end)
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(ck.tensors[last].start + 4)
    with pytest.raises(CheckpointError, match=f"changed since its header was validated \\(reading '{last}'\\)"):
        ck.read(last)


def aliased(src: Path, dst: Path, name: str, onto: str) -> Path:
    """The probe's liar: tensor `name`'s data_offsets point at the bytes of `onto` (same shape)."""
    model = copy_model(src, dst)
    path = model / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    assert header[name]["shape"] == header[onto]["shape"]
    header[name]["data_offsets"] = header[onto]["data_offsets"]
    raw_file(path, json.dumps(header).encode(), blob[8 + n:])
    return model


def test_aliased_offsets_fail_the_merge_not_corrupt_it(models, tmp_path):
    base, ft1, _ = models
    up = "model.layers.{}.mlp.up_proj.weight"
    liar = aliased(ft1, tmp_path / "liar", up.format(1), onto=up.format(0))
    with pytest.raises(CheckpointError, match=f"'{up.format(1)}': data_offsets .* overlap '{up.format(0)}'"):
        engine.run_merge(spec(base, [base, liar], "linear", parameters={"weight": 1.0}), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_cli_reports_a_lying_model_dir_in_one_line_with_exit_2(models, tmp_path):
    base, ft1, ft2 = models
    shutil.copytree(ft1, tmp_path / "victim")
    liar = copy_model(ft2, tmp_path / "liar")
    rewrite_index(liar, lambda wm: wm.update({k: "../victim/model.safetensors" for k in wm}))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"model": str(ft1)}, {"model": str(liar)}], "base_model": str(base),
                                   "merge_method": "ties", "parameters": {"weight": 0.5, "density": 0.5}}))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "fusion_ray.cli", "merge", str(cfg), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert str(liar / "model.safetensors.index.json") in res.stderr and "outside the model dir" in res.stderr
    assert not out.exists()


# --- fuzzing the header reader -------------------------------------------------------------------


def check_consistent(infos: dict, data: bytes) -> None:
    """What parse_header returns: known dtypes, sizes that match, ranges tiling the data section."""
    (n,) = struct.unpack("<Q", data[:8])
    base, covered = 8 + n, 8 + n
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        assert info.dtype in ST_DTYPES.values()
        assert all(type(d) is int and d >= 0 for d in info.shape)
        numel = 1
        for d in info.shape:
            numel *= d
        assert base <= info.start == covered <= info.end <= len(data)
        assert info.end - info.start == numel * info.dtype.itemsize
        covered = info.end
    assert covered == len(data)


def parse_bytes(data: bytes) -> dict:
    try:
        infos = parse_header("fuzz.safetensors", io.BytesIO(data), len(data))
    except CheckpointError as err:
        one_line(err)
        return {}
    check_consistent(infos, data)
    return infos


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), st.booleans())
def test_fuzz_arbitrary_bytes(blob, length, with_length):
    parse_bytes(struct.pack("<Q", length) + blob if with_length else blob)
    parse_bytes(struct.pack("<Q", len(blob)) + blob)


@FUZZ
@given(json_values, st.integers(0, 300), st.integers(-3, 3))
def test_fuzz_arbitrary_json_headers(header, data_len, length_delta):
    blob = json.dumps(header).encode()
    parse_bytes(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + bytes(data_len))


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from([*ST_DTYPES, "Q7", "U16", 3]),
    "shape": st.lists(st.integers(0, 5) | st.sampled_from([-1, 2**63, 1.0]), max_size=3),
    "data_offsets": st.lists(st.integers(0, 400), min_size=2, max_size=2)})
headers = st.dictionaries(st.text("abcdef.", min_size=1, max_size=4), entry | json_values, max_size=5)


@FUZZ
@given(headers, st.integers(0, 400), st.booleans())
def test_fuzz_random_offsets_dtypes_shapes_and_lengths(header, data_len, metadata):
    if metadata:
        header = {"__metadata__": {"format": "pt"}, **header}
    blob = json.dumps(header).encode()
    parse_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_len))


@st.composite
def near_valid_files(draw):
    """A valid layout (tensors tiled in a random order), then maybe one lie: a shifted offset, a
    wrong dtype, a truncated or padded data section, a tensor aliasing another's bytes.
    Returns (file bytes, header)."""
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), max_size=5, unique=True))
    header, offset = {}, 0
    for name in draw(st.permutations(names)):
        dtype = draw(st.sampled_from(list(ST_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * ST_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    size = offset
    lie = draw(st.sampled_from(["none", "shift", "dtype", "size", "alias"]))
    if lie == "alias" and len(names) > 1:  # one tensor claims another's bytes (and shape)
        a, b = draw(st.permutations(names))[:2]
        header[a] = json.loads(json.dumps(header[b]))
    elif lie == "shift" and names:
        h = header[draw(st.sampled_from(names))]
        i, delta = draw(st.integers(0, 1)), draw(st.integers(-8, 8))
        h["data_offsets"][i] = max(0, h["data_offsets"][i] + delta)
    elif lie == "dtype" and names:
        header[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(["Q7", "U16", *ST_DTYPES]))
    elif lie == "size":
        size = max(0, size + draw(st.integers(-8, 8)))
    blob = json.dumps(header).encode()
    blob += b" " * draw(st.integers(0, 7))
    data = bytes((i * 37 + 11) % 256 for i in range(size))
    return struct.pack("<Q", len(blob)) + blob + data, header


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_files())
def test_fuzz_agrees_with_the_safetensors_library(fuzz_dir, case):
    """Accepted exactly when the library accepts (and every dtype is one we merge); the same tensors."""
    data, header = case
    try:
        want = st_load(data)
    except Exception:
        want = None
    path = fuzz_dir / "model.safetensors"
    path.write_bytes(data)
    got = parse_bytes(data)
    ours = want is not None and all(h["dtype"] in ST_DTYPES for h in header.values())
    if not ours:
        assert not got, (header, len(data))
        with pytest.raises(CheckpointError):
            read_header(str(path))
        return
    assert got.keys() == want.keys()
    ck = Checkpoint(str(fuzz_dir))
    assert all(same_bytes(ck.read(n), want[n]) for n in want)


tensors = st.dictionaries(
    st.text("abcxyz._", min_size=1, max_size=6),
    st.tuples(st.sampled_from(list(ST_DTYPES.values())), st.lists(st.integers(0, 4), max_size=3)),
    max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors, st.integers(0, 2**32 - 1))
def test_files_the_safetensors_library_writes_are_read_identically(fuzz_dir, spec_, seed):
    g = torch.Generator().manual_seed(seed)
    made = {n: torch.randint(0, 2 if dt == torch.bool else 256, (int(torch.tensor(shape).prod()) * dt.itemsize,),
                             generator=g, dtype=torch.uint8).view(dt).reshape(shape)
            for n, (dt, shape) in spec_.items()}
    path = fuzz_dir / "model.safetensors"
    path.write_bytes(save(made, metadata={"format": "pt"}))
    ck = Checkpoint(str(fuzz_dir))
    assert ck.tensors.keys() == made.keys()
    assert all(same_bytes(ck.read(n), made[n]) for n in made)


# --- OUT_DIR: --force, leftovers, a file in the way ------------------------------------------------


def linear(models) -> object:
    base, ft1, _ = models
    return spec(base, [base, ft1], "linear", parameters={"weight": 1.0}, dtype="float32")


def test_force_refuses_a_dir_no_merge_wrote(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as err:
        engine.run_merge(linear(models), str(out), force=True)
    assert "not written by a merge (no merge_config.yaml)" in one_line(err.value)
    assert (out / "notes.txt").read_text() == "mine" and list(out.iterdir()) == [out / "notes.txt"]


def test_force_replaces_a_previous_merge_but_not_files_added_to_it(models, tmp_path):
    base, ft1, _ = models
    out = tmp_path / "out"
    engine.run_merge(linear(models), str(out))
    first = weights(out)
    engine.run_merge(spec(base, [base, ft1], "slerp", parameters={"t": 1.0}, dtype="float32"), str(out), force=True)
    assert "slerp" in (out / "merge_config.yaml").read_text()
    assert any(not torch.equal(first[k], v) for k, v in weights(out).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial / .stale left
    (out / "eval.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds files a merge does not write \(eval\.json\)"):
        engine.run_merge(linear(models), str(out), force=True)
    assert (out / "eval.json").exists() and "slerp" in (out / "merge_config.yaml").read_text()


def test_leftovers_of_killed_merges_are_removed_but_not_live_ones(models, tmp_path):
    out = tmp_path / "out"
    old = time.time() - 3600
    dead = {tmp_path / ".out.partial-0123abcd", tmp_path / ".out.stale-89abcdef"}
    live, young = tmp_path / ".out.partial-aaaaaaaa", tmp_path / ".out.partial-bbbbbbbb"
    others = [tmp_path / n for n in (".out.partial-notours", ".other.partial-01234567", "out.partial-01234567")]
    for d in [*dead, live, young, *others]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model.safetensors").write_bytes(b"x")
        os.utime(d, (old, old))
    os.utime(young, None)
    link = tmp_path / ".out.partial-cccccccc"
    link.symlink_to(others[0])
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a merge running now holds its dir
    try:
        engine.run_merge(linear(models), str(out))
    finally:
        os.close(fd)
    assert not any(d.exists() for d in dead)
    assert live.exists() and young.exists() and link.is_symlink() and all(d.exists() for d in others)
    assert (out / "merge_config.yaml").exists()


def test_out_dir_that_is_a_file_fails_before_any_work(models, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(FileExistsError) as err:
        engine.run_merge(linear(models), str(out), force=True)
    assert one_line(err.value) == f"output path {out} exists and is not a directory"
    missing = spec(tmp_path / "no-such-base", [tmp_path / "no-such-model"], "linear", parameters={"weight": 1.0})
    with pytest.raises(FileExistsError, match="exists and is not a directory"):  # before the inputs are looked at
        merge_standalone(missing, str(out))
    with pytest.raises(FileExistsError, match=f"output path {out} exists and is not a directory \\(in the output"):
        engine.run_merge(linear(models), str(out / "sub"))
    assert out.read_text() == "a file"
