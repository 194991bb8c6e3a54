"""The in-process guard: the code verifier before bubblewrap, kept for tests only (UNSAFE).

`implicit.sandbox.isolation: unsafe-in-process` selects it. The candidate runs in one child
interpreter with its tests, after a guard that patches `socket` and installs an audit hook that
refuses process creation, signals, `ctypes`, heap walks and writes outside its working directory;
rlimits, a process-group kill on the wall clock, an output cap and, where `unshare -rn` works, a
network namespace hold it from outside. The candidate shares the interpreter, its builtins and
the code that writes the verdict, so a candidate written to do so can fake a pass (issue #34 lists
six ways) or reach outside through native code: it is not a boundary, and no default uses it.
"""

from __future__ import annotations

import fcntl
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from fusion_ray.reward.judge import Verdict
from fusion_ray.reward.sandbox import Capture, SandboxLimits, set_limit, users_processes

TAIL = 2048
# Exit statuses the guard uses (a candidate can exit with them too; only 0 plus the nonce passes).
_EXIT_SYNTAX, _EXIT_MEMORY, _EXIT_BLOCKED, _EXIT_FAILED = 90, 91, 92, 1
_EXIT_REASONS = {_EXIT_SYNTAX: "syntax", _EXIT_MEMORY: "memory", _EXIT_BLOCKED: "blocked"}

# The guard: run with `python -I -c _GUARD <workdir> <nonce fd> <done fd>` in the working dir.
# It installs the socket patches and the audit hook, then compiles and runs solution.py and
# tests.py in one namespace, and on success writes the nonce to the done fd.
_GUARD = r'''
import os, sys

def _main():
    import gc, io, socket, _socket, traceback, linecache, types
    workdir = os.path.realpath(sys.argv[1])
    with os.fdopen(int(sys.argv[2]), "rb") as f:
        nonce = f.read()
    done = os.fdopen(int(sys.argv[3]), "wb", buffering=0)
    sources = {}
    for name in ("solution.py", "tests.py"):
        with open(os.path.join(workdir, name), encoding="utf-8", errors="replace") as f:
            sources[name] = f.read()

    violations = []

    class SandboxViolation(PermissionError):
        def __init__(self, *args):
            super().__init__(*args)
            violations.append(args)  # a refusal a library wraps in its own error still counts

    def refuse(*_a, **_k):
        raise SandboxViolation("network access is disabled in the sandbox")

    class _NoSocket(socket.socket):
        def __init__(self, *a, **k):
            refuse()

    socket.socket = socket.SocketType = _NoSocket
    _socket.socket = _socket.SocketType = _NoSocket
    socket.create_connection = socket.create_server = socket.socketpair = socket.fromfd = refuse
    _socket.socketpair = refuse

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = frozenset({
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
        "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
        "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "sys.remote_exec", "_posixsubprocess.fork_exec",
    })
    denied_imports = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_winapi"})
    # event: (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
    }
    realpath, isdir, fspath = os.path.realpath, os.path.isdir, os.fspath
    prefix = workdir + os.sep

    def inside(path):
        if isinstance(path, int):
            return False
        try:
            real = realpath(os.fsdecode(fspath(path)))
        except (TypeError, ValueError):
            return False
        return real == workdir or real.startswith(prefix)

    def hook(event, args):
        if event in denied:
            raise SandboxViolation(f"{event} is not allowed in the sandbox")
        if event == "import" and args and args[0] in denied_imports:
            raise SandboxViolation(f"importing {args[0]} is not allowed in the sandbox")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if isinstance(path, int) or path is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if inside(path):
                return
            if writing:
                raise SandboxViolation(f"writing {path!r} (outside the working directory) is not allowed")
            try:
                directory = isdir(path)
            except (TypeError, ValueError, OSError):
                directory = False
            if directory:  # a directory fd would let dir_fd= calls escape
                raise SandboxViolation(f"opening the directory {path!r} is not allowed")
            return
        spec = path_events.get(event)
        if spec is not None:
            paths, dir_fds = spec
            for i in dir_fds:
                if i < len(args) and args[i] is not None and args[i] != -1:
                    raise SandboxViolation(f"{event} with dir_fd is not allowed in the sandbox")
            for i in paths:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise SandboxViolation(f"{event} on {args[i]!r} (outside the working directory) is not allowed")

    sys.addaudithook(hook)
    sys.argv = ["solution.py"]
    main = types.ModuleType("__main__")  # unittest.main() looks its tests up in sys.modules["__main__"]
    main.__file__ = os.path.join(workdir, "solution.py")
    sys.modules["__main__"] = main
    namespace = main.__dict__
    try:
        code = compile(sources["solution.py"], "solution.py", "exec")
        tests = compile(sources["tests.py"], "tests.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(90)

    def finish(status):
        sys.stdout.flush()
        sys.stderr.flush()
        if status == 0:
            done.write(nonce)
        os._exit(status)

    def innermost_own_file(tb):
        name = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename in ("solution.py", "tests.py"):
                name = tb.tb_frame.f_code.co_filename
            tb = tb.tb_next
        return name

    try:
        exec(code, namespace)
        exec(tests, namespace)
    except SystemExit as e:
        ok = e.code in (None, 0) and innermost_own_file(e.__traceback__) == "tests.py"
        if not ok:
            print(f"sandbox: SystemExit({e.code!r}) before the tests finished", file=sys.stderr)
        finish(0 if ok else (e.code if isinstance(e.code, int) and e.code else 1))
    except MemoryError:
        traceback.print_exc()
        finish(91)
    except BaseException:
        traceback.print_exc()
        finish(92 if violations else 1)
    finish(0)

_main()
'''

_unshare_checked: bool | None = None
_unshare_lock = threading.Lock()


def unshare_available() -> bool:
    """Whether `unshare -rn` (a user + network namespace) works here; detected once per process."""
    global _unshare_checked
    with _unshare_lock:
        if _unshare_checked is None:
            exe = shutil.which("unshare")
            ok = False
            if exe and sys.platform.startswith("linux"):
                try:
                    ok = subprocess.run([exe, "-rn", "true"], stdin=subprocess.DEVNULL, capture_output=True,
                                        timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
            _unshare_checked = ok
        return _unshare_checked


def _preexec(limits: SandboxLimits, nproc: int):
    cpu = max(1, int(limits.cpu_seconds))

    def apply() -> None:  # runs in the child between fork and exec: keep it to syscalls
        set_limit(resource.RLIMIT_CPU, cpu)  # soft == hard: SIGKILL at the limit
        set_limit(resource.RLIMIT_AS, int(limits.memory_bytes))
        set_limit(resource.RLIMIT_FSIZE, int(limits.file_bytes))
        set_limit(resource.RLIMIT_NOFILE, int(limits.open_files))
        set_limit(resource.RLIMIT_CORE, 0)
        set_limit(resource.RLIMIT_NPROC, nproc)

    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode_tail(data: bytes, limit: int = TAIL) -> str:
    return data[-limit:].decode("utf-8", errors="replace")


def _classify(status: int, timed_out: bool, over: bool, stderr: str, cpu_used: float,
              limits: SandboxLimits, completed: bool) -> tuple[bool, str]:
    if timed_out:
        return False, "timeout"
    if over:
        return False, "output_limit"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits.cpu_seconds - 0.5):
            return False, "timeout"
        # not from ru_maxrss: a forked child's peak counts its parent's pages before exec (a Ray
        # actor holding a reward model would make every killed run look like a memory hog)
        if "MemoryError" in stderr:
            return False, "memory"
        return False, "killed"
    code = os.WEXITSTATUS(status)
    if code == 0:
        return (True, "passed") if completed else (False, "incomplete")
    if code in _EXIT_REASONS:
        return False, _EXIT_REASONS[code]
    if "MemoryError" in stderr:
        return False, "memory"
    return False, "failed"


def run_guarded(code: str, tests: str, *, limits: SandboxLimits = SandboxLimits()) -> Verdict:
    """Run `code` and then `tests` (one namespace, as one script) in the sandbox.

    Passed means the tests ran to their end without an exception (asserts are the usual tests).
    Never raises for anything the candidate does; the working directory is always removed and the
    child's process group always killed.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="fr_sandbox_")
    proc: subprocess.Popen[bytes] | None = None
    pgid: int | None = None
    fds: list[int] = []
    try:
        for name, text in (("solution.py", code), ("tests.py", tests)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        done_r, done_w = os.pipe()
        fds += [nonce_r, nonce_w, done_r, done_w]
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        fds.remove(nonce_w)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir,
               "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8"}
        argv = [sys.executable, "-I", "-c", _GUARD, workdir, str(nonce_r), str(done_w)]
        if unshare_available():
            argv = [shutil.which("unshare") or "unshare", "-rn", *argv]
        nproc = users_processes(os.getuid()) + max(1, limits.processes)
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, pass_fds=(nonce_r, done_w),
                                    preexec_fn=_preexec(limits, nproc))
        except OSError as e:
            return Verdict(False, "error", None, time.monotonic() - start, stderr_tail=str(e)[-TAIL:])
        pgid = proc.pid  # start_new_session: the child leads its own group
        for fd in (nonce_r, done_w):
            os.close(fd)
            fds.remove(fd)
        assert proc.stdout is not None and proc.stderr is not None
        out = Capture(proc.stdout, limits.output_bytes, lambda: _kill_group(pgid))
        err = Capture(proc.stderr, limits.output_bytes, lambda: _kill_group(pgid))

        deadline = start + limits.wall_seconds
        timed_out = False
        status, rusage = 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() >= deadline:
                timed_out = True
                _kill_group(pgid)
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        _kill_group(pgid)  # grandchildren that outlived the child
        for capture in (out, err):
            capture.thread.join(timeout=2.0)  # a surviving writer outside the group cannot hold us
        fcntl.fcntl(done_r, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            completed = os.read(done_r, 256) == nonce
        except (BlockingIOError, OSError):
            completed = False
        stderr_text = _decode_tail(bytes(err.data), 8 * TAIL)
        cpu_used = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
        passed, reason = _classify(status, timed_out, out.over or err.over, stderr_text, cpu_used,
                                   limits, completed)
        return Verdict(passed, reason, proc.returncode, time.monotonic() - start,
                       stderr_tail=stderr_text[-TAIL:], stdout_head=bytes(out.data[:TAIL]).decode("utf-8", "replace"))
    finally:
        if pgid is not None:
            _kill_group(pgid)
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            if proc.returncode is None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
