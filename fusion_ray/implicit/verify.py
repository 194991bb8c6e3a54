"""Rule verifiers for the implicit-fusion reward stage: math answers and code run in a sandbox.

Math: `extract_answer` finds a response's final answer (a balanced `\\boxed{...}`, else the text
after the last "answer is" / "Answer:" / "####", else the last number), `normalize_answer`
puts it in a canonical form (numbers as exact fractions, so "0.50", ".5", "1/2" and
"\\frac{1}{2}" agree), and `math_correct` compares a response with a gold answer. No sympy:
symbolic answers that are not numbers are compared as normalised strings.

Code: `run_code` runs a candidate solution followed by its tests in a child interpreter, and
`verify_code` first pulls the code out of a chat response. The child is contained in layers:

1. Resource limits (`resource.setrlimit` in the child before exec): CPU seconds, address space,
   file size, open files, no core dumps, and processes. RLIMIT_NPROC counts every process of the
   user, so it is set to the user's current count plus `SandboxLimits.processes`; the kernel does
   not apply it to root at all (the audit guard below is what stops a fork bomb there).
2. A wall-clock limit: the child runs in its own session and process group, which is killed with
   SIGKILL when the time is up and, in any case, once the run is over (leftover grandchildren).
3. Bounded output: stdout and stderr are read by threads into buffers of at most
   `output_bytes`; a child that writes more is killed ("output_limit").
4. A guard installed inside the child before the candidate code runs (`_GUARD`): the `socket`
   module's constructors are replaced, and a `sys.addaudithook` hook refuses, with
   `PermissionError`, socket creation and connection, process creation (fork, exec, spawn,
   `os.system`, `subprocess`), signals to other processes, `ctypes`, heap introspection
   (`gc.get_objects` and friends) and every write, removal, rename, mkdir, chmod... outside the
   working directory (relative `dir_fd` arguments are refused, and so is opening a directory
   outside the working directory, which would provide one). Audit hooks cannot be removed once
   added, which makes this hold against ordinary Python code.
5. When `unshare -rn` works on the machine (detected once), the child runs in a fresh user and
   network namespace: it has no network interface but loopback of its own, so even native code
   cannot reach the host's listeners.

This is defence in depth for untrusted *model outputs* on a machine we control, not a security
boundary: native code (an extension module, or `_posixsubprocess` loaded by hand) is held only by
the rlimits, the process-group kill and, where available, the network namespace. Run the stage
under a dedicated unprivileged user or in a container when the inputs may be adversarial.

Completion: the tests count as passed only when the child exits with status 0 *and* the guard
reports, on a private pipe and with a nonce the parent sent it, that the tests ran to their end
(or ended in `SystemExit(0)` raised outside the candidate code, as `unittest.main()` does). A
candidate that calls `os._exit(0)` or `sys.exit(0)` before the tests get to it does not pass.
The nonce lives in the child's memory, so code that deliberately walks the interpreter's frames
could forge it; the guard refuses the heap walks but not frame access, which ordinary code needs.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "SandboxLimits",
    "Verdict",
    "extract_answer",
    "extract_code",
    "math_correct",
    "normalize_answer",
    "run_code",
    "unshare_available",
    "verify_code",
]

# ---------------------------------------------------------------------------------------------
# Math answers
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER = re.compile(r"(?:answer\s+is|answer\s*:|####)", re.IGNORECASE)
_NUMBER = re.compile(r"[-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\frac(\d)(\d)$")
_SLASH = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def _balanced(text: str, open_at: int) -> str | None:
    """The text inside the brace at `open_at` up to its matching close, or None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer in a response, or None when it states none.

    A `\\boxed{...}` (the last one, braces balanced) wins; else the text after the last
    "answer is" / "Answer:" / "####" (up to the end of its line or sentence); else the last number.
    """
    for m in reversed(list(_BOXED.finditer(response))):
        inner = _balanced(response, m.end() - 1)
        if inner is not None and inner.strip():
            return inner.strip()
    markers = list(_MARKER.finditer(response))
    if markers:
        rest = response[markers[-1].end() :].lstrip(" \t:=").split("\n", 1)[0]
        rest = re.split(r"[.!?;](?:\s|$)", rest, maxsplit=1)[0].strip().strip("*").strip()
        if rest:
            return rest
    numbers = _NUMBER.findall(response)
    return numbers[-1].strip() if numbers else None


def _to_fraction(s: str) -> Fraction | None:
    """An exact value for a plain number, fraction or `\\frac`, or None."""
    for pattern in (_FRAC, _FRAC_SHORT):
        m = pattern.match(s)
        if m:
            try:
                value = Fraction(m.group(2)) / Fraction(m.group(3))
            except (ValueError, ZeroDivisionError):
                return None
            return -value if m.group(1) else value
    m = _SLASH.match(s)
    if m:
        try:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        except (ValueError, ZeroDivisionError):
            return None
    if _DECIMAL.match(s):
        return Fraction(s)
    return None


def normalize_answer(s: str) -> str:
    """A canonical form of an answer: numbers exact (`str(Fraction)`), other text de-formatted."""
    s = s.replace("\u2212", "-").replace("\u2013", "-").strip()
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_MACRO.sub(r"\1", s)
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(spacing, "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    while s.startswith("{") and s.endswith("}") and _balanced(s, 0) == s[1:-1]:
        s = s[1:-1]
    s = re.sub(r"^[A-Za-z]=", "", s)  # "x=5"
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    value = _to_fraction(s)
    return str(value) if value is not None else s


def math_correct(response: str, gold: str) -> bool:
    """Whether the response's final answer equals the gold answer (exactly, for numbers).

    The gold may be a bare answer or a worked solution ending in `\\boxed{}` / "#### n".
    """
    predicted = extract_answer(response)
    if predicted is None:
        return False
    gold_answer = gold
    if _BOXED.search(gold) or "####" in gold:
        gold_answer = extract_answer(gold) or gold
    a, b = normalize_answer(predicted), normalize_answer(gold_answer)
    return bool(a) and a == b


# ---------------------------------------------------------------------------------------------
# Code in a sandbox
# ---------------------------------------------------------------------------------------------

MiB = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run (see the module docstring for how each is enforced)."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * MiB  # address space (RLIMIT_AS)
    file_bytes: int = 1 * MiB  # largest file the child may write (RLIMIT_FSIZE)
    processes: int = 32  # on top of the user's current process count (RLIMIT_NPROC)
    output_bytes: int = 64 * 1024  # captured stdout and stderr, each
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass
class Verdict:
    """The outcome of one sandboxed run.

    `reason` is one of: "passed", "failed" (an assertion or other exception, or a nonzero exit),
    "timeout" (wall clock or CPU limit), "memory", "killed" (another signal), "syntax",
    "output_limit", "blocked" (the run failed after the guard refused an operation),
    "incomplete" (exit status 0 but the tests never ran to their end), "error" (the sandbox
    itself could not start the child).
    """

    passed: bool
    reason: str
    returncode: int | None
    seconds: float
    stderr_tail: str = ""  # the last 2 KiB of stderr
    stdout_head: str = ""  # the first 2 KiB of stdout
    # the child's peak resident memory as the kernel reports it: an upper bound that includes the
    # parent's pages it was forked with (so not used to classify), None when unknown
    max_rss_bytes: int | None = None


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


def _user_process_count() -> int:
    """How many processes the current user has (RLIMIT_NPROC counts them all)."""
    uid = os.getuid()
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


def _set_limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _preexec(limits: SandboxLimits, nproc: int):
    cpu = max(1, int(limits.cpu_seconds))

    def apply() -> None:  # runs in the child between fork and exec: keep it to syscalls
        _set_limit(resource.RLIMIT_CPU, cpu)  # soft == hard: SIGKILL at the limit
        _set_limit(resource.RLIMIT_AS, int(limits.memory_bytes))
        _set_limit(resource.RLIMIT_FSIZE, int(limits.file_bytes))
        _set_limit(resource.RLIMIT_NOFILE, int(limits.open_files))
        _set_limit(resource.RLIMIT_CORE, 0)
        _set_limit(resource.RLIMIT_NPROC, nproc)

    return apply


class _Capture:
    """Reads one pipe into a bounded buffer; `over` is set when the child wrote past the cap."""

    def __init__(self, stream, cap: int, on_overflow) -> None:
        self.cap, self.on_overflow = cap, on_overflow
        self.data = bytearray()
        self.over = False
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        try:
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                room = self.cap - len(self.data)
                if len(chunk) > room:
                    self.data += chunk[: max(room, 0)]
                    if not self.over:
                        self.over = True
                        self.on_overflow()
                else:
                    self.data += chunk
        except (OSError, ValueError):
            pass


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


def run_code(code: str, tests: str, *, limits: SandboxLimits = SandboxLimits()) -> Verdict:
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
        nproc = _user_process_count() + max(1, limits.processes)
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
        out = _Capture(proc.stdout, limits.output_bytes, lambda: _kill_group(pgid))
        err = _Capture(proc.stderr, limits.output_bytes, lambda: _kill_group(pgid))

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
        max_rss = rusage.ru_maxrss * 1024 if rusage is not None else None  # KiB on Linux
        passed, reason = _classify(status, timed_out, out.over or err.over, stderr_text, cpu_used,
                                   limits, completed)
        return Verdict(passed, reason, proc.returncode, time.monotonic() - start,
                       stderr_tail=stderr_text[-TAIL:], stdout_head=bytes(out.data[:TAIL]).decode("utf-8", "replace"),
                       max_rss_bytes=max_rss)
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


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The code in a chat response: the last ```python block, else the last fenced block, else all."""
    blocks = _FENCE.findall(response)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return response


def verify_code(response: str, tests: str, limits: SandboxLimits = SandboxLimits()) -> Verdict:
    """Run the code in a chat response against `tests` in the sandbox (see `run_code`)."""
    return run_code(extract_code(response), tests, limits=limits)
