"""Untrusted code under bubblewrap: the operating system is the boundary, not the interpreter.

`Sandbox.start` runs one Python program in a bubblewrap container (Debian package `bubblewrap`):

- new user, pid, network, ipc, uts and mount namespaces (`--unshare-all`), all capabilities
  dropped, no new privileges, further user namespaces disabled;
- an unprivileged uid/gid inside and outside: a verifier running as root drops to
  `SandboxSettings.uid` (default 65534, "nobody") before bubblewrap starts, so the sandbox's
  processes are nobody's on the host too;
- a read-only view of what Python needs (`/usr`, the interpreter's own prefix, the packages a test
  may import, each bound alone), a fresh `/proc` of the sandbox's own pid namespace, only the
  null/zero/random devices, and a private tmpfs `/tmp` (its size capped) as the only writable
  place; no host socket, no host file but those;
- `--die-with-parent` and a pid namespace: the sandbox's init is its only way to the host's
  processes, and when it dies the kernel kills every process left in the namespace, so killing
  bubblewrap ends everything a run started (forked, re-sessioned, holding pipes, or not).

Limits are set from outside: rlimits (CPU seconds, address space, file size, open files, no core,
processes) on bubblewrap before it execs, inherited by everything inside, and, where this
machine's cgroups can be written (cgroup v2, or v1's `pids`/`memory`/`cpuacct` hierarchies), a
cgroup per run with `pids.max`, a memory cap over all its processes and its CPU time read by
the parent. The wall clock and the output cap are the parent's: it kills the run when either is
passed.

Not inside the boundary: kernel exploits (the sandbox shares the host kernel; no seccomp
filter is loaded: bubblewrap takes a compiled BPF program and the project ships no compiler
for one), and CPU or memory bandwidth taken from other work while the run lasts.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
NOBODY = 65534
INSIDE_PYTHON = "/sandbox/python"  # where a non-/usr interpreter's prefix is bound
INSIDE_PACKAGES = "/sandbox/site"  # where the allowed packages are bound (on sys.path)
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
EXTRA_PROCESSES = 3  # bubblewrap's own: the monitor outside, the namespace's init, the exec'd program


class SandboxUnavailable(RuntimeError):
    """Bubblewrap cannot run here (the message says why, in one line)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * MiB  # address space of each process (RLIMIT_AS); the cgroup's cap over all
    file_bytes: int = 1 * MiB  # largest file the run may write (RLIMIT_FSIZE)
    processes: int = 32  # processes the run may start (cgroup pids.max; RLIMIT_NPROC as the floor)
    output_bytes: int = 64 * 1024  # captured stdout and stderr, each
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class SandboxSettings:
    """Where and as whom a sandbox runs."""

    uid: int = NOBODY  # the host uid a root verifier drops to (and the uid inside)
    python: str | None = None  # the interpreter; None: this one if the sandbox can run it, else /usr/bin/python3
    packages: tuple[str, ...] = ()  # importable modules bound read-only (e.g. "numpy")
    tmpfs_bytes: int = 16 * MiB  # size of the writable /tmp


@dataclass
class Finished:
    """How one sandboxed process ended."""

    status: int  # a wait status
    timed_out: bool
    cpu_timed_out: bool
    over: bool  # stdout or stderr passed the output cap
    stdout: bytes
    stderr: bytes
    seconds: float
    cpu_seconds: float


# --- the interpreter and what it needs ------------------------------------------------------------


@functools.cache
def _prefix_of(python: str) -> str:
    out = subprocess.run([python, "-I", "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise SandboxUnavailable(f"the sandbox interpreter {python} does not run: {out.stderr.strip()[-200:]}")
    return out.stdout.strip()


def _package_paths(names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(host path, path inside) of each allowed package: its directory or module file."""
    import importlib.util

    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin and not spec.submodule_search_locations:
            raise SandboxUnavailable(f"implicit.sandbox.packages: {name!r} is not importable here")
        if spec.submodule_search_locations:
            host = list(spec.submodule_search_locations)[0]
        else:
            host = spec.origin
        out.append((host, f"{INSIDE_PACKAGES}/{os.path.basename(host)}"))
    return out


def _merged_usr_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin as on the host: symlinks into /usr (merged /usr), else read-only binds."""
    args = []
    for top in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = f"/{top}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def bwrap_argv(settings: SandboxSettings, python: str, inner: list[str]) -> list[str]:
    """The bubblewrap command line that runs `inner` (an argv whose first item is `python`)."""
    base, inside_python = _bwrap_base(settings, python)
    return [*base, inside_python, *inner[1:]]


@functools.cache
def _bwrap_base(settings: SandboxSettings, python: str) -> tuple[tuple[str, ...], str]:
    """(bubblewrap's arguments up to `--`, the interpreter's path inside): the same for every run
    with these settings, so worked out (which, readlink, find_spec) once per process."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (`bwrap`) is not installed: install the Debian package bubblewrap")
    prefix = _prefix_of(python)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(settings.uid),
            "--gid", str(settings.uid), "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--setenv", "PYTHONIOENCODING", "utf-8",
            "--ro-bind", "/usr", "/usr", *_merged_usr_links(), "--proc", "/proc", "--dir", "/dev"]
    for dev in DEVICES:
        if os.path.exists(dev):
            argv += ["--dev-bind", dev, dev]
    inside_python = python
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        argv += ["--ro-bind", prefix, INSIDE_PYTHON]
        inside_python = INSIDE_PYTHON + python.removeprefix(prefix) if python.startswith(prefix) else python
    for host, inside in _package_paths(settings.packages):
        argv += ["--ro-bind", host, inside]
    argv += ["--size", str(settings.tmpfs_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
    return tuple(argv), inside_python


# --- cgroups --------------------------------------------------------------------------------------


class Cgroup:
    """One run's cgroup (v2, or v1's pids / memory / cpuacct), where this process may create one."""

    V1 = ("pids", "memory", "cpuacct")

    def __init__(self, limits: SandboxLimits) -> None:
        self.dirs: dict[str, Path] = {}
        try:
            self._make(limits)
        except BaseException:
            self.kill_and_remove()  # a half-made group (a controller not enabled here) goes
            raise

    def _make(self, limits: SandboxLimits) -> None:
        name = f"fusion_ray_sandbox/{uuid.uuid4().hex}"
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():  # v2
            own = Path(open("/proc/self/cgroup").read().strip().split("::", 1)[-1].lstrip("/"))
            base = root / own.parent / "fusion_ray_sandbox" if own.name else root / "fusion_ray_sandbox"
            d = base / name.rsplit("/", 1)[1]
            d.mkdir(parents=True)
            self.dirs["v2"] = d
            self._write(d / "pids.max", limits.processes + EXTRA_PROCESSES)
            self._write(d / "memory.max", limits.memory_bytes + 64 * MiB)
            self._write(d / "memory.swap.max", 0, required=False)
        else:
            for ctl in self.V1:
                d = root / ctl / name
                d.mkdir(parents=True)
                self.dirs[ctl] = d
            self._write(self.dirs["pids"] / "pids.max", limits.processes + EXTRA_PROCESSES)
            self._write(self.dirs["memory"] / "memory.limit_in_bytes", limits.memory_bytes + 64 * MiB)

    @staticmethod
    def _write(path: Path, value: int, required: bool = True) -> None:
        try:
            path.write_text(str(value))
        except OSError:
            if required:
                raise

    @classmethod
    def create(cls, limits: SandboxLimits) -> Cgroup | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls(limits)
        except (OSError, ValueError):
            return None

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    @staticmethod
    def join(procs: list[str]) -> None:
        """In the child before exec: move this process into the cgroup (`procs`: its `cgroup.procs`
        files, listed by the parent; syscalls only here)."""
        pid = str(os.getpid()).encode()
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def cpu_seconds(self) -> float | None:
        try:
            if "v2" in self.dirs:
                for line in (self.dirs["v2"] / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
            elif "cpuacct" in self.dirs:
                return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def pids(self) -> list[int]:
        found = set()
        for path in self.procs:
            try:
                found |= {int(x) for x in open(path).read().split()}
            except (OSError, ValueError):
                pass
        return sorted(found)

    def kill_and_remove(self) -> None:
        kill = self.dirs.get("v2", Path("/nonexistent")) / "cgroup.kill"
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            if kill.exists():
                self._write(kill, 1, required=False)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)
        for d in self.dirs.values():
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


# --- one run --------------------------------------------------------------------------------------


def users_processes(uid: int) -> int:
    """How many processes `uid` has (RLIMIT_NPROC counts them all)."""
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 256
    for entry in entries:
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _preexec(limits: SandboxLimits, uid: int | None, nproc: int, cgroup: Cgroup | None):
    cpu = max(1, int(limits.cpu_seconds))
    procs = cgroup.procs if cgroup is not None else []

    def apply() -> None:  # in the child between fork and exec: syscalls only
        Cgroup.join(procs)
        set_limit(resource.RLIMIT_CPU, cpu)
        set_limit(resource.RLIMIT_AS, int(limits.memory_bytes))
        set_limit(resource.RLIMIT_FSIZE, int(limits.file_bytes))
        set_limit(resource.RLIMIT_NOFILE, int(limits.open_files))
        set_limit(resource.RLIMIT_CORE, 0)
        set_limit(resource.RLIMIT_NPROC, nproc)
        if uid is not None:  # a root verifier: the sandbox runs as an unprivileged user outside too
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return apply


class Capture:
    """Reads one pipe into a buffer of at most `cap` bytes; calls `on_overflow` once past it."""

    def __init__(self, stream, cap: int, on_overflow) -> None:
        self.cap, self.on_overflow, self.data, self.over = cap, on_overflow, bytearray(), False
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        try:
            while chunk := stream.read1(65536):
                room = self.cap - len(self.data)
                self.data += chunk[: max(room, 0)]
                if len(chunk) > room and not self.over:
                    self.over = True
                    self.on_overflow()
        except (OSError, ValueError):
            pass


class Sandbox:
    """One program running under bubblewrap; `wait` ends it, whatever it does, within its limits."""

    def __init__(self, inner: list[str], limits: SandboxLimits, settings: SandboxSettings, pass_fds=()) -> None:
        self.limits, self.started = limits, time.monotonic()
        python = inner[0]
        argv = bwrap_argv(settings, python, inner)
        root = os.geteuid() == 0
        uid = settings.uid if root else None
        owner = settings.uid if root else os.getuid()
        self.cgroup = Cgroup.create(limits) if root else None
        try:
            self.proc = self._spawn(argv, limits, uid, owner, pass_fds)
        except subprocess.SubprocessError:
            if self.cgroup is None:
                raise
            # the cgroup was made but this process may not move into it (cgroup v2 delegation
            # rules): rlimits alone, as where no cgroup can be made
            self.cgroup.kill_and_remove()
            self.cgroup = None
            self.proc = self._spawn(argv, limits, uid, owner, pass_fds)
        except BaseException:
            if self.cgroup is not None:
                self.cgroup.kill_and_remove()
            raise
        self.out = Capture(self.proc.stdout, limits.output_bytes, self.kill)
        self.err = Capture(self.proc.stderr, limits.output_bytes, self.kill)
        self.result: Finished | None = None

    def _spawn(self, argv, limits, uid, owner, pass_fds) -> subprocess.Popen:
        # RLIMIT_NPROC counts every process of the user, so sandboxes running side by side as one
        # uid share it: where the run's cgroup holds its pids.max, the rlimit is only a loose floor
        nproc = users_processes(owner) + (limits.processes + EXTRA_PROCESSES) * (1 if self.cgroup is None else 8)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=tuple(pass_fds), cwd="/",
                                preexec_fn=_preexec(limits, uid, nproc, self.cgroup))

    def kill(self) -> None:
        """SIGKILL to bubblewrap's process group: its namespace's init dies with it, and the kernel
        ends every process left in the namespace."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def poll(self) -> bool:
        """Whether the run has ended (and is reaped); kills it past its wall clock or CPU time."""
        if self.result is not None:
            return True
        pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
        timed_out = cpu_out = False
        if not pid:
            cpu = self.cgroup.cpu_seconds() if self.cgroup is not None else None
            if time.monotonic() - self.started >= self.limits.wall_seconds:
                timed_out = True
            elif cpu is not None and cpu >= self.limits.cpu_seconds:
                cpu_out = True
            else:
                return False
            self.kill()
            _, status, rusage = os.wait4(self.proc.pid, 0)
        self._finish(status, rusage, timed_out, cpu_out)
        return True

    def _finish(self, status: int, rusage, timed_out: bool, cpu_out: bool) -> None:
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = self.cgroup.cpu_seconds() if self.cgroup is not None else None
        if cpu is None:
            cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
        self.end()
        seconds = time.monotonic() - self.started
        # bubblewrap exits 128 + the signal that ended its command. Without a cgroup the parent sees
        # no CPU time of the namespace's processes, so a SIGKILL / SIGXCPU after at least the CPU
        # limit's wall time is taken for RLIMIT_CPU (RLIMIT_AS raises MemoryError, it kills nothing)
        code = os.waitstatus_to_exitcode(status)
        cpu_kill = (code in (128 + signal.SIGKILL, 128 + signal.SIGXCPU, -signal.SIGKILL, -signal.SIGXCPU)
                    and seconds >= 0.9 * self.limits.cpu_seconds and not timed_out)
        self.result = Finished(status, timed_out, cpu_out or cpu_kill or cpu >= self.limits.cpu_seconds - 0.05,
                               self.out.over or self.err.over, bytes(self.out.data), bytes(self.err.data),
                               seconds, cpu)

    def end(self) -> None:
        """Kill whatever is left (the namespace, the cgroup) and close the pipes."""
        self.kill()
        if self.cgroup is not None:
            self.cgroup.kill_and_remove()
            self.cgroup = None
        for capture in (self.out, self.err):
            capture.thread.join(timeout=2.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        if self.proc.returncode is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def wait(self) -> Finished:
        while not self.poll():
            time.sleep(0.005)
        assert self.result is not None
        return self.result


# --- can it run here -------------------------------------------------------------------------------

_PROBE = "import sys; print('ok', sys.version_info[0], sys.version_info[1])"


@functools.cache
def _probe(settings: SandboxSettings, python: str) -> str | None:
    """None when `python` runs in the sandbox here, else why not."""
    try:
        box = Sandbox([python, "-I", "-S", "-c", _PROBE], SandboxLimits(cpu_seconds=10, wall_seconds=30),
                      settings)
        done = box.wait()
    except (SandboxUnavailable, OSError, subprocess.SubprocessError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if done.status == 0 and done.stdout.startswith(b"ok"):
        return None
    why = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return why[-1] if why else f"exit status {os.waitstatus_to_exitcode(done.status)}"


@functools.cache
def interpreter(settings: SandboxSettings = SandboxSettings()) -> str:
    """The interpreter candidates run on: `settings.python`, else this process's own where the
    sandbox can run it (its prefix readable by the sandbox's uid), else /usr/bin/python3.
    Raises SandboxUnavailable (one line) when none runs."""
    if settings.python:
        choices = [settings.python]
    else:
        choices = [os.path.realpath(sys.executable), "/usr/bin/python3"]
    reasons = []
    for python in dict.fromkeys(choices):
        if not os.path.exists(python):
            reasons.append(f"{python}: not found")
            continue
        why = _probe(settings, python)
        if why is None:
            return python
        reasons.append(f"{python}: {why}")
    raise SandboxUnavailable("bubblewrap cannot run a Python sandbox here (" + "; ".join(reasons) + ")")


def available(settings: SandboxSettings = SandboxSettings()) -> str | None:
    """None when code can be verified in the sandbox here, else the one-line reason."""
    try:
        interpreter(settings)
    except SandboxUnavailable as e:
        return str(e)
    return None


__all__ = ["Finished", "Sandbox", "SandboxLimits", "SandboxSettings", "SandboxUnavailable", "available",
           "bwrap_argv", "interpreter"]
