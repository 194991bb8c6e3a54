"""Where things live: one resolver for every model, tokenizer, corpus and stage reference.

A reference is one of:

- `demo:NAME`: an asset of the embedded default, built offline by `fusion_ray.demo`, which
  registers the scheme (`register_scheme`) when `fusion_ray` is imported; this module knows
  only the registered functions;
- an object-store URI (`s3://bucket/key`, `gs://…`, anything `pyarrow.fs` reads); S3-compatible
  stores are reached through `AWS_ENDPOINT_URL` (or `FUSION_RAY_S3_ENDPOINT`), which this module
  hands to pyarrow;
- a hub id (`org/name`, with an optional revision): fetched once per node into the HF cache by
  `huggingface_hub` (`HF_HUB_OFFLINE=1` is respected: then only the cache is read);
- a local path.

Libraries that need a local directory (transformers, vLLM, safetensors) get one from
`local_dir`: a local path as is, a demo asset once built, a hub id from the HF cache, and an
object-store prefix copied once into this node's cache (`$FUSION_RAY_CACHE/objects/`), keyed
by the URI and the listing's sizes and modification times, so a second run or a second worker
on the same node reuses it and a changed object gets a fresh copy. Copies land atomically
(a temp dir renamed into place under a file lock).

This module imports neither torch, ray nor transformers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pyarrow.fs is imported where an object store is touched: a local or demo path needs none
    import pyarrow.fs as pafs

DEMO_SCHEME = "demo:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
URI = re.compile(r"^[a-z][a-z0-9+.-]*://")
ENDPOINT_ENV = ("FUSION_RAY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Environment a Ray worker needs to reach the same stores and caches as the driver.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", *ENDPOINT_ENV, "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")
# `dir/file.jsonl` is a data file's path, never a hub id (a missing one is reported as a missing path)
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".yaml", ".yml")
Kind = Literal["demo", "uri", "hub", "local"]
# Files a model dir needs for its config and tokenizer (what `plan` and `validate` read).
CONFIG_FILES = ("config.json",)


class LocationError(ValueError):
    """A reference that cannot be used: unknown demo asset, missing path, unreachable store or hub id."""


def cache_root() -> Path:
    """This node's cache: demo assets, object-store copies, vocabulary maps."""
    return Path(os.environ.get("FUSION_RAY_CACHE", Path.home() / ".cache" / "fusion_ray"))


def kind(ref: str) -> Kind:
    """What kind of reference `ref` is (no I/O except one `exists` for local-looking names)."""
    if ref.startswith(DEMO_SCHEME):
        return "demo"
    if URI.match(ref) and not ref.startswith("file://"):
        return "uri"
    if (HUB_ID.match(ref) and not Path(ref).expanduser().exists() and not ref.startswith(("./", "../"))
            and not ref.endswith(DATA_FILE_SUFFIXES)):
        return "hub"
    return "local"


def absolute(ref: str, *, path_only: bool = False, base: str | os.PathLike[str] | None = None) -> str:
    """`ref` with a local path made absolute against `base` (default: the working directory).

    Demo assets, object-store URIs and hub ids come back as they are. A config's paths are made
    absolute once, on the driver, when it is loaded: Ray workers (a Ray Train worker, an actor)
    run in directories of their own, where a relative path names something else.

    Args:
        path_only: `ref` is never a hub id (a workdir, a log dir that may not exist yet): anything
            but a demo asset or a URI is a local path.
    """
    k = kind(ref)
    if k in ("demo", "uri") or (k == "hub" and not path_only):
        return ref
    scheme = "file://" if ref.startswith("file://") else ""
    path = Path(ref.removeprefix(scheme)).expanduser()
    if not path.is_absolute():
        path = Path(base if base is not None else os.getcwd()) / path
    return scheme + os.path.normpath(path)


def is_remote(ref: str) -> bool:
    return kind(ref) == "uri"


# --- object stores -------------------------------------------------------------------------


def endpoint() -> str | None:
    """The S3 endpoint override from the environment, if any."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(ref: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI.

    `s3://` URIs honour the endpoint override (an S3-compatible store such as MinIO or moto);
    `file://` and plain paths are local.
    """
    import pyarrow.fs as pafs

    if URI.match(ref) and not ref.startswith("file://"):
        scheme, _, rest = ref.partition("://")
        if scheme == "s3" and endpoint():
            url = endpoint()
            fs = pafs.S3FileSystem(endpoint_override=url.split("://", 1)[-1],
                                   scheme="https" if url.startswith("https") else "http",
                                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            return fs, rest.rstrip("/")
        fs, path = pafs.FileSystem.from_uri(ref)
        return fs, path.rstrip("/")
    local = ref.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def listing(ref: str) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime ns) of every file below a URI or local dir (or of one file)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(ref)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(info.base_name, info.size, info.mtime_ns or 0)]
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if i.type == pafs.FileType.File:
            out.append((i.path[len(path):].lstrip("/"), i.size, i.mtime_ns or 0))
    return sorted(out)


def upload(local: str | Path, dest: str, *, skip: tuple[str, ...] = ()) -> int:
    """Copy a local file or directory tree to `dest` (URI or local path); returns bytes copied.

    On object stores each file is one PUT (readers see a whole object or none); the caller
    writes its marker (a stage's manifest) last.
    """
    local = Path(local)
    fs, root = filesystem(dest)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    total = 0
    for f in files:
        rel = f.name if f == local else str(f.relative_to(local))
        if rel.split("/")[0] in skip or f.name in skip:
            continue
        target = root if local.is_file() else f"{root}/{rel}"
        parent = target.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        with open(f, "rb") as src, fs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
        total += f.stat().st_size
    return total


def download(ref: str, dest: Path, *, only: tuple[str, ...] | None = None) -> None:
    """Copy the object(s) below `ref` into the local dir `dest` (or only the named files)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(ref)
    info = fs.get_file_info(root)
    names = [(info.base_name, root)] if info.type == pafs.FileType.File else [
        (rel, f"{root}/{rel}") for rel, _, _ in listing(ref)]
    for rel, src in names:
        if only is not None and rel not in only:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(src) as fh, open(target, "wb") as out:
            shutil.copyfileobj(fh, out, length=8 << 20)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`'s sibling `.NAME.lock` (processes on one node build `path` once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialize_uri(ref: str) -> str:
    """The node-local copy of an object-store file or prefix (made once, atomically)."""
    import pyarrow.fs as pafs

    from fusion_ray.hashing import fingerprint

    files = listing(ref)
    if not files:
        raise LocationError(f"nothing at {ref}")
    fs, path = filesystem(ref)
    is_file = len(files) == 1 and fs.get_file_info(path).type == pafs.FileType.File
    key = fingerprint(ref, files)
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    dest = cache_root() / "objects" / f"{name}-{key}"
    final = dest / name if is_file else dest
    if dest.exists():
        return str(final)
    with file_lock(dest):
        if not dest.exists():
            tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                download(ref, tmp)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# --- the hub ---------------------------------------------------------------------------------


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_dir(ref: str, revision: str | None, allow_patterns: list[str] | None = None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(ref, revision=revision, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError as err:
        where = "in the offline HF cache (HF_HUB_OFFLINE=1)" if offline() else "on the hub or in the HF cache"
        raise LocationError(f"hub id {ref}{'@' + revision if revision else ''} not found {where}") from err
    except Exception as err:  # network, auth, missing repo: one line naming the id
        raise LocationError(f"hub id {ref}: {type(err).__name__}: {str(err).splitlines()[0]}") from err


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What resolves references of a registered scheme (`demo:NAME`).

    Attributes:
        names: the names the scheme knows.
        path: name → where it lives, built or not (no work done).
        resolve: reference → a local path, building what is missing.
    """

    names: tuple[str, ...]
    path: Callable[[str], Path]
    resolve: Callable[[str], str]


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(prefix: str, scheme: Scheme) -> None:
    """Make references starting with `prefix` resolve through `scheme` (its package registers it)."""
    _SCHEMES[prefix] = scheme


def _scheme(prefix: str) -> Scheme:
    if prefix not in _SCHEMES:
        raise LocationError(f"no resolver is registered for {prefix!r} references")
    return _SCHEMES[prefix]


# --- the one entry point ------------------------------------------------------------------


def local_dir(ref: str, *, revision: str | None = None) -> str:
    """A local path for `ref` that transformers, vLLM and safetensors can read.

    Raises:
        LocationError: naming the reference when it cannot be reached.
    """
    k = kind(ref)
    if k == "demo":
        return _scheme(DEMO_SCHEME).resolve(ref)
    if k == "hub":
        return _hub_dir(ref, revision)
    if k == "uri":
        return _materialize_uri(ref)
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        raise LocationError(f"path does not exist: {ref}")
    return str(path)


def corpus_path(ref: str) -> str:
    """A corpus: local file/dir (object stores copied to this node, demo assets built); a hub
    dataset id stays an id (the `datasets` library streams it)."""
    if kind(ref) == "hub":
        return ref
    return local_dir(ref)


def model_config(ref: str, *, revision: str | None = None) -> dict | None:
    """A model's `config.json` without downloading its weights; None when it cannot be read.

    Local dirs and demo assets (not built: None) are read in place, object stores read the one
    object, hub ids the one file (from the HF cache, or the hub unless offline).
    """
    k = kind(ref)
    try:
        if k == "demo":
            path = _scheme(DEMO_SCHEME).path(ref.removeprefix(DEMO_SCHEME)) / "config.json"
            return json.loads(path.read_text()) if path.is_file() else None
        if k == "uri":
            fs, root = filesystem(ref)
            with fs.open_input_stream(f"{root}/config.json") as fh:
                return json.loads(fh.read())
        if k == "hub":
            return json.loads(Path(_hub_dir(ref, revision, ["config.json"])).joinpath("config.json").read_text())
        path = Path(ref).expanduser() / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, LocationError, ValueError):
        return None


def check(ref: str, *, what: str = "model") -> str:
    """Syntax-level check used by config validation (no network, no downloads).

    A demo asset must be a known name; a local-looking path must exist; URIs and hub ids
    are checked for reachability by `reachable` (`fusion-ray validate`) and when loaded.

    Raises:
        LocationError: naming the reference.
    """
    k = kind(ref)
    if k == "demo":
        name, known = ref[len(DEMO_SCHEME):], _scheme(DEMO_SCHEME).names
        if name not in known:
            raise LocationError(f"unknown demo asset {name!r}; known: {', '.join(known)}")
        return ref
    if k == "local" and not Path(ref.removeprefix("file://")).expanduser().exists():
        full = absolute(ref)
        raise LocationError(f"{what} path does not exist: {ref}" + (f" ({full})" if full != ref else ""))
    return ref


def reachable(ref: str, *, revision: str | None = None, what: str = "model") -> str | None:
    """None when `ref` can be read from here, else one line saying why not (no weights fetched)."""
    import pyarrow.fs as pafs

    k = kind(ref)
    try:
        if k in ("demo", "local"):
            check(ref, what=what)
            return None
        if k == "uri":
            fs, path = filesystem(ref)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return f"{what} {ref}: nothing at that location"
            return None
        if what == "corpus":  # a hub dataset: ask the hub (or the datasets cache) for its files
            return _dataset_reachable(ref, revision)
        _hub_dir(ref, revision, ["config.json"])
        return None
    except LocationError as err:
        return f"{what} {ref}: {err}" if ref not in str(err) else str(err)
    except OSError as err:
        return f"{what} {ref}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _dataset_reachable(ref: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ref, repo_type="dataset", revision=revision, allow_patterns=["README.md"])
        return None
    except Exception as err:
        where = "offline HF cache (HF_HUB_OFFLINE=1)" if offline() else "hub or the HF cache"
        return f"corpus {ref}: hub dataset not found in the {where} ({type(err).__name__})"


def writable(ref: str) -> str | None:
    """None when stage outputs can be written below `ref`, else one line saying why not.

    Creates nothing that stays: a local workdir's nearest existing parent must be a writable
    dir; on an object store the bucket must exist (it is never created here) and a small probe
    object is written and deleted.
    """
    import pyarrow.fs as pafs

    if kind(ref) != "uri":
        path = Path(ref.removeprefix("file://")).expanduser().absolute()
        parent = next(p for p in (path, *path.parents) if p.exists())
        if not parent.is_dir():
            if parent == path:
                return f"workdir {ref} is a file, not a directory"
            return f"workdir {ref} is not writable: {parent} is a file, not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"workdir {ref} is not writable: no write permission on {parent}"
        return None
    try:
        fs, path = filesystem(ref)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"workdir {ref} is not writable: bucket {bucket} does not exist"
        probe = f"{path}/_write_probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
        return None
    except (OSError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"workdir {ref} is not writable: {msg}"


def fingerprint(ref: str, *, revision: str | None = None) -> str:
    """Cheap content fingerprint of an input: file names, sizes and mtimes (local, demo, store),
    or the id and revision (hub; the cache's resolved commit when it is there)."""
    from fusion_ray.hashing import fingerprint as fp

    k = kind(ref)
    if k == "hub":
        return fp(ref, revision)
    if k == "demo":
        ref = str(_scheme(DEMO_SCHEME).path(ref.removeprefix(DEMO_SCHEME)))
        if not Path(ref).exists():
            return fp(ref, revision)
    return fp(listing(ref), revision)


def worker_env() -> dict[str, str]:
    """The variables from `FORWARDED_ENV` set here, for a Ray runtime environment."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
