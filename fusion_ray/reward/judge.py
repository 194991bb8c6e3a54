"""The verdict on a code response, reached where the candidate cannot reach it.

Two sandboxes (`reward/sandbox.py`) per response, joined by two pipes:

- the **candidate's** runs the response's code and then only serves calls: the tests' side names
  a top-level function, class or instance method and sends plain-data arguments; it answers
  with the plain-data result (or the exception's type and message). It never sees the tests, an
  expected value or the verdict's code; its stdin is empty.
- the **tests'** runs the tests unchanged, with each of the candidate's top-level names bound to a
  proxy that forwards calls through the pipe. Every top-level `assert` and expression statement
  of the tests is one case (a HumanEval-style `check(candidate)` call is one), and so is every
  test method of a `unittest.TestCase` class they define (`unittest.main()` is not run: the
  harness runs the cases). It writes one JSON line per case to a third pipe that only the
  verifier reads.

Only plain data crosses between them (None, bool, int, float, str, bytes, complex, and lists,
tuples, dicts, sets of them, decoded by the receiving side into its own objects), so a candidate
cannot hand the tests an object whose `__eq__` always agrees. Other objects the candidate
returns stay in its sandbox and cross as a handle whose attributes and methods are again calls,
and which equals only itself. The verifier passes a response when the tests' side reported
every case it ran, at least one, as passed and said it was done; exit statuses are not read.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

from fusion_ray.reward.sandbox import Sandbox, SandboxLimits, SandboxSettings, interpreter

MAX_MESSAGE = 8 << 20  # bytes of one message on the call pipes
MAX_REPORT = 1 << 20  # bytes of the tests' report the verifier reads
TAIL = 2048

# Plain data as JSON: scalars as themselves, the rest tagged ({"$t": [...]} a tuple, ...). Each side
# decodes into its own objects; anything else crosses as a handle {"$h": id} (the candidate's side).
_CODEC = r'''
import json, math, sys
sys.path.append("/sandbox/site")

class _Unsendable(TypeError):
    pass

def _enc(x, handle=None, depth=0):
    if depth > 64:
        raise _Unsendable("nested deeper than 64")
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return x if math.isfinite(x) else {"$f": repr(x)}
    if t is list:
        return [_enc(v, handle, depth + 1) for v in x]
    if t is tuple:
        return {"$t": [_enc(v, handle, depth + 1) for v in x]}
    if t is dict:
        return {"$d": [[_enc(k, handle, depth + 1), _enc(v, handle, depth + 1)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"$s" if t is set else "$fs": [_enc(v, handle, depth + 1) for v in x]}
    if t is bytes:
        return {"$b": x.hex()}
    if t is complex:
        return {"$c": [x.real, x.imag]}
    if handle is not None:
        return {"$h": handle(x)}
    raise _Unsendable(f"a {t.__name__} cannot be sent to the candidate")

def _dec(x, handle=None):
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_dec(v, handle) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed message")
    (tag, v), = x.items()
    if tag == "$t":
        return tuple(_dec(i, handle) for i in v)
    if tag == "$d":
        return {_dec(k, handle): _dec(i, handle) for k, i in v}
    if tag == "$s":
        return {_dec(i, handle) for i in v}
    if tag == "$fs":
        return frozenset(_dec(i, handle) for i in v)
    if tag == "$b":
        return bytes.fromhex(v)
    if tag == "$c":
        return complex(float(v[0]), float(v[1]))
    if tag == "$f":
        return float(v)
    if tag == "$h" and handle is not None and type(v) is int:
        return handle(v)
    raise ValueError(f"malformed message tag {tag!r}")

def _send(stream, obj):
    stream.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    stream.flush()

def _recv(stream, limit):
    line = stream.readline(limit + 1)
    if not line:
        raise EOFError("the other side is gone")
    if len(line) > limit:
        raise ValueError("message too large")
    return json.loads(line)
'''

# The candidate's side: `python -I -S -c CANDIDATE <source fd> <calls in fd> <results out fd> <limit>`.
CANDIDATE = _CODEC + r'''
import os, sys, traceback

def _serve():
    src_fd, rx_fd, tx_fd, limit = (int(a) for a in sys.argv[1:5])
    with os.fdopen(src_fd, "rb") as f:
        source = f.read().decode("utf-8", "replace")
    rx, tx = os.fdopen(rx_fd, "rb"), os.fdopen(tx_fd, "wb")
    sys.argv = ["solution.py"]
    objects = {}

    def handle(obj):
        objects[id(obj)] = obj
        return id(obj)

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exc()
        _send(tx, {"ready": False, "error": "syntax"})
        return
    try:
        exec(code, namespace)
    except MemoryError:
        traceback.print_exc()
        _send(tx, {"ready": False, "error": "memory"})
        return
    except BaseException as e:
        traceback.print_exc()
        _send(tx, {"ready": False, "error": type(e).__name__})
        return
    names = {}
    shadowed = set(dir(__import__("builtins")))
    for k, v in list(namespace.items()):
        if k.startswith("__") or k in shadowed:  # the tests keep the real builtins
            continue
        try:
            names[k] = {"value": _enc(v)}
        except _Unsendable:
            names[k] = {"handle": handle(v)}
    _send(tx, {"ready": True, "names": names})
    while True:
        try:
            msg = _recv(rx, limit)
        except EOFError:
            return
        try:
            target = objects[msg["target"]]
            if msg["op"] == "getattr":
                result = getattr(target, msg["name"])
            else:
                args = _dec(msg["args"], objects.__getitem__)
                kwargs = _dec(msg["kwargs"], objects.__getitem__)
                result = target(*args, **kwargs)
            reply = {"ok": _enc(result, handle)}
        except MemoryError:
            reply = {"raise": "MemoryError", "message": ""}
        except BaseException as e:
            reply = {"raise": type(e).__name__, "message": str(e)[:500]}
        _send(tx, reply)

_serve()
'''

# The tests' side: `python -I -c TESTS <tests fd> <calls out fd> <results in fd> <report fd> <limit>`.
TESTS = _CODEC + r'''
import ast, os, sys, traceback, unittest

def _run():
    tests_fd, tx_fd, rx_fd, report_fd, limit = (int(a) for a in sys.argv[1:6])
    with os.fdopen(tests_fd, "rb") as f:
        source = f.read().decode("utf-8", "replace")
    tx, rx = os.fdopen(tx_fd, "wb"), os.fdopen(rx_fd, "rb")
    report = os.fdopen(report_fd, "w", buffering=1)

    def say(**row):
        report.write(json.dumps(row) + "\n")

    class CandidateError(Exception):
        pass

    class Remote:
        """An object of the candidate's: its attributes and calls are asked for; equal only to itself."""
        __slots__ = ("_ref", "_name")

        def __init__(self, ref, name):
            object.__setattr__(self, "_ref", ref)
            object.__setattr__(self, "_name", name)

        def __call__(self, *args, **kwargs):
            return ask({"op": "call", "target": self._ref, "args": _enc(list(args), send_ref),
                        "kwargs": _enc(kwargs, send_ref)}, self._name)

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return ask({"op": "getattr", "target": self._ref, "name": name}, f"{self._name}.{name}")

        def __repr__(self):
            return f"<candidate's {self._name}>"

    def send_ref(obj):
        if type(obj) is Remote:
            return obj._ref
        raise _Unsendable(f"a {type(obj).__name__} cannot be sent to the candidate")

    def ask(msg, name):
        try:
            _send(tx, msg)
            reply = _recv(rx, limit)
        except (EOFError, BrokenPipeError, OSError, ValueError) as e:
            raise CandidateError(f"the candidate stopped answering ({e})") from None
        if "raise" in reply:
            kind = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
                    "IndexError": IndexError, "ZeroDivisionError": ZeroDivisionError,
                    "AttributeError": AttributeError, "RecursionError": RecursionError,
                    "NotImplementedError": NotImplementedError,
                    "MemoryError": MemoryError}.get(reply.get("raise"), CandidateError)
            raise kind(f"{reply.get('raise')}: {reply.get('message', '')}"[:600])
        return _dec(reply["ok"], lambda ref: Remote(ref, name))

    try:
        hello = _recv(rx, limit)
    except (EOFError, ValueError, OSError) as e:
        say(candidate="gone", detail=str(e)[:200])
        return
    if not hello.get("ready"):
        say(candidate=str(hello.get("error", "error"))[:40])
        return
    namespace = {"__name__": "tests", "__builtins__": __builtins__}
    for name, entry in hello["names"].items():
        if name in sys.stdlib_module_names:  # a module the tests use unimported: their own, not the candidate's
            try:
                namespace[name] = __import__(name)
                continue
            except ImportError:
                pass
        if "handle" in entry:
            namespace[name] = Remote(entry["handle"], name)
        else:
            namespace[name] = _dec(entry["value"])
    unittest.main = lambda *a, **k: None  # the harness runs the cases
    try:
        tree = ast.parse(source, "tests.py")
    except SyntaxError as e:
        say(setup_error=f"the tests do not parse: {e}"[:600])
        return
    cases = 0
    for node in tree.body:
        case = isinstance(node, ast.Assert) or isinstance(node, ast.Expr) and not (
            isinstance(node.value, ast.Constant) or ast.unparse(node.value) in ("unittest.main()", "main()"))
        code = compile(ast.Module([node], []), "tests.py", "exec")
        try:
            exec(code, namespace)
        except BaseException as e:
            if not case:
                say(setup_error=f"line {node.lineno}: {type(e).__name__}: {e}"[:600])
                return
            say(case=cases, line=node.lineno, ok=False, error=f"{type(e).__name__}: {e}"[:600])
        else:
            if case:
                say(case=cases, line=node.lineno, ok=True)
        cases += case
    loader = unittest.TestLoader()
    for value in list(namespace.values()):
        if isinstance(value, type) and issubclass(value, unittest.TestCase) and value is not unittest.TestCase:
            for test in loader.loadTestsFromTestCase(value):
                result = unittest.TestResult()
                test.run(result)
                problems = result.failures + result.errors + [(t, "unexpected success") for t in
                                                               result.unexpectedSuccesses]
                ok = result.testsRun == 1 and not problems
                say(case=cases, test=test.id(), ok=ok,
                    error=(problems[0][1].strip().splitlines()[-1][:600] if problems else ""))
                cases += 1
    say(done=True, cases=cases)

try:
    _run()
except BaseException:
    traceback.print_exc()
'''


@dataclass
class Verdict:
    """The outcome of one verification.

    `reason`: "passed"; "failed" (a case failed); "syntax" (the code does not compile); "error"
    (the code raised before any test could call it); "incomplete" (the candidate left before the
    tests ended, or the tests' side never said it was done); "no_tests" (the tests hold no case);
    "tests_error" (the tests' own set-up failed); "timeout" (wall clock or CPU time); "memory";
    "output_limit"; "killed" (another signal).
    """

    passed: bool
    reason: str
    returncode: int | None
    seconds: float
    stderr_tail: str = ""  # the candidate's last 2 KiB of stderr
    stdout_head: str = ""  # the candidate's first 2 KiB of stdout
    cases: int = 0  # cases the tests' side reported
    failed_cases: int = 0
    detail: str = ""  # the first failed case's error, or the tests' set-up error


def _feed(fd: int, data: bytes) -> threading.Thread:
    def run():
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _read_report(fd: int, out: list[bytes]) -> threading.Thread:
    def run():
        size = 0
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read1(65536):
                size += len(chunk)
                if size <= MAX_REPORT:
                    out.append(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def judge(code: str, tests: str, limits: SandboxLimits = SandboxLimits(),
          settings: SandboxSettings = SandboxSettings()) -> Verdict:
    """Run `code` in the candidate's sandbox and `tests` in their own, and judge from the tests'
    report (see the module docstring). Raises SandboxUnavailable when bubblewrap cannot run here;
    never raises for anything the candidate does."""
    python = interpreter(settings)
    start = time.monotonic()
    pipes = {name: os.pipe() for name in ("src", "tests", "calls", "answers", "report")}
    src_r, src_w = pipes["src"]
    tests_r, tests_w = pipes["tests"]
    calls_r, calls_w = pipes["calls"]
    answers_r, answers_w = pipes["answers"]
    report_r, report_w = pipes["report"]
    boxes: list[Sandbox] = []
    try:
        candidate = Sandbox([python, "-I", "-S", "-c", CANDIDATE, str(src_r), str(calls_r), str(answers_w),
                             str(MAX_MESSAGE)], limits, settings, pass_fds=(src_r, calls_r, answers_w))
        boxes.append(candidate)
        tester = Sandbox([python, "-I", "-c", TESTS, str(tests_r), str(calls_w), str(answers_r), str(report_w),
                          str(MAX_MESSAGE)], limits, settings, pass_fds=(tests_r, calls_w, answers_r, report_w))
        boxes.append(tester)
    except BaseException:
        for box in boxes:
            box.end()
        for r, w in pipes.values():
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        raise
    for fd in (src_r, calls_r, answers_w, tests_r, calls_w, answers_r, report_w):
        os.close(fd)  # the sandboxes hold their ends; the verifier keeps only what it writes and reads
    feeders = [_feed(src_w, code.encode("utf-8", "replace")), _feed(tests_w, tests.encode("utf-8", "replace"))]
    chunks: list[bytes] = []
    reader = _read_report(report_r, chunks)
    # the tests' side ends the run: once it is done the candidate has nothing left to answer
    while not tester.poll():
        candidate.poll()  # past its own wall clock or CPU time it is killed; the tests see it gone
        time.sleep(0.005)
    done_tests = tester.result
    candidate.kill()
    done_candidate = candidate.wait()
    reader.join(timeout=2.0)
    for t in feeders:
        t.join(timeout=1.0)
    rows = []
    for line in b"".join(chunks)[:MAX_REPORT].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return _verdict(rows, done_candidate, done_tests, time.monotonic() - start)


def _verdict(rows: list[dict], cand, tests, seconds: float) -> Verdict:
    cases = [r for r in rows if "case" in r]
    failed = [r for r in cases if r.get("ok") is not True]
    done = next((r for r in rows if r.get("done") is True), None)
    gone = next((r.get("candidate") for r in rows if "candidate" in r), None)
    setup = next((r.get("setup_error") for r in rows if "setup_error" in r), None)
    errors = [str(r.get("error", "")) for r in failed]
    stderr = cand.stderr
    killed = os.WIFSIGNALED(cand.status) and not (cand.timed_out or cand.over)
    base = dict(returncode=None if cand.timed_out or cand.over else os.waitstatus_to_exitcode(cand.status),
                seconds=seconds, stderr_tail=stderr[-TAIL:].decode("utf-8", "replace"),
                stdout_head=cand.stdout[:TAIL].decode("utf-8", "replace"), cases=len(cases),
                failed_cases=len(failed), detail=(errors[0] if errors else setup or "")[:600])

    def v(reason: str) -> Verdict:
        return Verdict(passed=reason == "passed", reason=reason, **base)

    complete = (done is not None and not failed and gone is None and setup is None and cases
                and done.get("cases") == len(cases) == len({r.get("case") for r in cases}))
    if complete:
        return v("passed")
    if cand.over or tests.over:
        return v("output_limit")
    if gone == "syntax":
        return v("syntax")
    if gone == "memory" or any(e.startswith("MemoryError") for e in errors) or b"MemoryError" in stderr:
        return v("memory")
    if cand.timed_out or tests.timed_out or cand.cpu_timed_out or tests.cpu_timed_out:
        return v("timeout")
    if killed and os.WTERMSIG(cand.status) != signal.SIGKILL:
        return v("killed")
    if gone is not None:
        return v("incomplete" if gone == "gone" else "error")
    if setup is not None:
        return v("tests_error")
    if done is not None and not cases:
        return v("no_tests")
    if any(e.startswith("CandidateError: the candidate stopped") for e in errors) or done is None:
        return v("incomplete")
    return v("failed")
