"""A real multi-node Ray cluster on this machine, and an offline HF cache of the demo models.

`LocalCluster` starts a head (`ray start --head --block`) and extra nodes
(`ray start --address … --block`), each in its own session with its own ports and
`--temp-dir`, so a node can be removed mid-run (its whole process tree killed) and the
cluster torn down without touching any other Ray on the machine (`ray stop` would).

`lay_out_hf_cache` writes model dirs into an HF cache (`HF_HOME/hub/models--org--name/
{refs/main, snapshots/<commit>/…}`) as `huggingface_hub` lays out a download, so with
`HF_HUB_OFFLINE=1` a hub id resolves to the snapshot dir (`fusion_ray.locations.local_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The demo's models as hub ids of the offline cache.
DEMO_HUB_IDS = {"pivot": "fusionray/tiny-pivot", "source_computing": "fusionray/tiny-source-computing",
                "source_english": "fusionray/tiny-source-english"}
# Auth off (Ray 2.60 turns token auth on); nodes stay on loopback through `--node-ip-address`.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `fusion_ray.ray_env` sets for a local Ray, makes
# `ray start --address` refuse to add a node ("Multi-node Ray clusters are not supported"): 1 here.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ports Ray would otherwise take at fixed defaults (another Ray on the machine holds them).
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
HEAD_PORT_FLAGS = ("--port", "--ray-client-server-port", *NODE_PORT_FLAGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the offline HF cache --------------------------------------------------------------------


def snapshot_commit(model_dir: Path) -> str:
    """A 40-hex 'commit' for a model dir: the SHA-1 of its file names and contents."""
    h = hashlib.sha1()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_dir)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def lay_out_hf_cache(hf_home: Path, models: dict[str, Path]) -> dict[str, Path]:
    """Copy each model dir into `hf_home/hub` as the snapshot of hub id `org/name` at `main`.

    Returns hub id → its snapshot dir. Files are plain copies (huggingface_hub reads a
    snapshot's files whether they are symlinks into blobs/ or not).
    """
    out = {}
    for hub_id, src in models.items():
        if hub_id.count("/") != 1:
            raise ValueError(f"a hub id is org/name, got {hub_id!r}")
        repo = hf_home / "hub" / ("models--" + hub_id.replace("/", "--"))
        commit = snapshot_commit(src)
        snapshot = repo / "snapshots" / commit
        if not snapshot.is_dir():
            tmp = snapshot.with_name(f"{commit}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.lock", ".*"))
            os.replace(tmp, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        out[hub_id] = snapshot
    return out


def demo_hf_cache(hf_home: Path) -> dict[str, str]:
    """The three demo models in an offline HF cache; returns demo model name → hub id."""
    from fusion_ray.demo.assets import MODEL_NAMES, asset_path
    from fusion_ray.demo.builds import ensure_assets

    ensure_assets()
    lay_out_hf_cache(hf_home, {DEMO_HUB_IDS[name]: asset_path(name) for name in MODEL_NAMES})
    return dict(DEMO_HUB_IDS)


def in_use(paths: set[Path]) -> set[Path]:
    """Those of `paths` some live process has open or mapped."""
    names = {str(p) for p in paths}
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.removesuffix(" (deleted)") in names:
                    used.add(Path(target))
            used.update(Path(line.split()[-1]) for line in (proc / "maps").read_text().splitlines()
                        if line.split()[-1] in names)
        except OSError:
            continue
    return used


# --- a multi-node Ray cluster of `ray start` processes -----------------------------------------


@dataclass
class Node:
    """One `ray start --block` process (and, once started, the Ray processes below it)."""

    name: str
    temp_dir: Path
    proc: subprocess.Popen
    log: Path
    head: bool = False
    resources: dict = field(default_factory=dict)

    def processes(self) -> list:
        """This node's live processes: the `ray start` tree, its process group, and anything naming its temp dir."""
        import psutil

        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                mine = str(self.temp_dir) in " ".join(p.info["cmdline"] or []) or os.getpgid(p.pid) == self.proc.pid
            except (psutil.Error, ProcessLookupError, OSError):
                continue
            if mine and p.pid != os.getpid():
                found.setdefault(p.pid, p)
                try:
                    found.update({c.pid: c for c in p.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15) -> int:
        """Kill every process of this node (a node lost: SIGKILL; a clean stop: SIGTERM first).

        Returns the number of processes signalled.
        """
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return len(procs)


def node_resource(name: str) -> str:
    """The custom resource that marks node `name` (request 0.01 of it to run there)."""
    return f"fusion_ray_node_{name}"


class LocalCluster:
    """A Ray cluster of several nodes on this machine, each a `ray start --block` process.

    Args:
        root: a short dir for the nodes' temp dirs (Ray's socket paths must stay < 108 chars).
        env: extra environment for every node (and the jobs' drivers, which run on the head).
    """

    def __init__(self, root: Path, env: dict[str, str] | None = None, object_store_mb: int = 768):
        self.root = Path(root)
        self.object_store = object_store_mb << 20
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **RAY_ENV, **(env or {}),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    # our worktree, not the venv's editable install of another checkout
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []
        self.gcs_address = ""
        self.dashboard_url = ""
        self.shm_before = set(Path("/dev/shm").glob("*"))
        self.pymp_before = set(Path(tempfile.gettempdir()).glob("pymp-*"))

    def _start(self, name: str, args: list[str], num_cpus: float, env: dict | None, resources: dict | None,
               head: bool) -> Node:
        temp = self.root / name
        log = self.root / f"{name}.log"
        # a custom resource names the node (`ray start` has no node name); a small object store:
        # the default (30 % of RAM per node) is too much on a shared machine
        resources = {**(resources or {}), node_resource(name): 1}
        cmd = ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--object-store-memory", str(self.object_store),
               "--resources", json.dumps(resources), *args,
               *[x for flag in (HEAD_PORT_FLAGS if head else NODE_PORT_FLAGS) for x in (flag, str(free_port()))]]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        node = Node(name, temp, proc, log, head=head, resources=resources)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: float = 2, env: dict | None = None, timeout: float = 180) -> Node:
        dashboard = free_port()
        node = self._start("head", ["--head", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                    "--include-dashboard", "true"], num_cpus, env, None, head=True)
        # `--port` was given a free port by _start; read it back from the command line
        args = node.proc.args
        gcs = int(args[args.index("--port") + 1])
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._wait(lambda: self._api("/api/version") is not None and self.is_alive(node), timeout,
                   "the head's dashboard", node)
        return node

    def add_node(self, name: str, num_cpus: float = 2, env: dict | None = None, resources: dict | None = None,
                 timeout: float = 120) -> Node:
        """Start a worker node; returns once the head lists it alive."""
        node = self._start(name, ["--address", self.gcs_address], num_cpus, env, resources, head=False)
        self._wait(lambda: self.is_alive(node), timeout, f"node {name} to join", node)
        return node

    def remove_node(self, node: Node, timeout: float = 90) -> None:
        """Kill a node's processes (SIGKILL: a lost machine) and wait until the head marks it dead."""
        node.kill(signal.SIGKILL)
        self.nodes.remove(node)
        self._wait(lambda: not self.is_alive(node), timeout, f"the head to see {node.name} gone", None)

    def is_alive(self, node: Node) -> bool:
        return any(node_resource(node.name) in n.get("resources_total", {}) for n in self.alive_nodes())

    def alive_nodes(self) -> list[dict]:
        reply = self._api("/api/v0/nodes?detail=false&limit=100")
        if not reply:
            return []
        return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def _api(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}{path}", timeout=10) as resp:
                body = resp.read()
            return json.loads(body) if path != "/api/version" else {"ok": body}
        except (OSError, ValueError):
            return None

    def _wait(self, ready, timeout: float, what: str, node: Node | None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if node is not None and node.proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {node.name} exited ({node.proc.returncode}):\n"
                                   f"{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for {what}")
            time.sleep(1)

    def submit(self, entrypoint: list[str], runtime_env: dict, cwd: Path = REPO, tries: int = 30) -> str:
        """`ray job submit --no-wait`; returns the job id (the job server may ask to try again at first)."""
        import re

        for _ in range(tries):
            out = subprocess.run(["ray", "job", "submit", "--address", self.dashboard_url, "--no-wait",
                                  "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
                                 env=self.env, capture_output=True, text=True, cwd=cwd)
            if out.returncode == 0 or "No available agent" not in out.stderr:
                break
            time.sleep(5)
        if out.returncode != 0:
            raise RuntimeError(f"ray job submit failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)  # the output carries colour codes

    def wait_job(self, job_id: str, timeout: float) -> tuple[str, str]:
        """(final status, logs) of a submitted job."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + timeout
        final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while (status := client.get_job_status(job_id)) not in final:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                logs = client.get_job_logs(job_id)[-3000:]
                raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f}s:\n{logs}")
            time.sleep(3)
        return str(status.value), client.get_job_logs(job_id)

    def shutdown(self) -> None:
        """Stop every node (workers first), then remove the temp dirs and the shared memory they left."""
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        new = {p for p in set(Path("/dev/shm").glob("*")) - self.shm_before if p.is_file()}
        for leftover in new - in_use(new):  # another engineer's live engine may have made one meanwhile
            leftover.unlink(missing_ok=True)
        # multiprocessing's dirs (a listener socket inside) that Ray's killed processes left behind
        bound = Path("/proc/net/unix").read_text()
        for leftover in set(Path(tempfile.gettempdir()).glob("pymp-*")) - self.pymp_before:
            if str(leftover) not in bound:
                shutil.rmtree(leftover, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
