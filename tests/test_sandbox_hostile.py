"""Candidates written to beat the code verifier (issue #34), one or more per way in: each must end
contained, judged failed (never passed), and leave nothing behind (`no_leftovers`: no process of
the sandbox's user, no cgroup, no scratch dir; each test also checks its own target).

On 86ff168, where the candidate ran in the verifier's interpreter behind an audit hook, the fake
passes below were judged passed, the writes landed, the victim process was signalled or limited,
and the survivor outlived the wall clock (`bench/verify.py` runs the same kinds of candidate
through both and counts what each judged passed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
from sandbox_helpers import SMALL, SOLUTION, TESTS, check, no_leftovers  # noqa: F401 - an autouse fixture

from fusion_ray.reward.verify import SandboxLimits, run_code

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]  # ~50 s of sandboxes: not the unit tier
WRONG = "def add(a, b):\n    return 0\n"
FAST = SandboxLimits(cpu_seconds=2, wall_seconds=3, memory_bytes=SMALL.memory_bytes, output_bytes=SMALL.output_bytes)
UNITTESTS = ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
             "        self.assertEqual(add(2, 3), 5)\n        self.assertEqual(add(-1, 1), 0)\nunittest.main()\n")

# --- fake passes: a wrong answer dressed as a right one -------------------------------------------

FAKES = {
    # a SystemExit(0) from code compiled under the tests' file name (the guard took it for the tests')
    "exit_as_the_tests": WRONG + "exec(compile('raise SystemExit(0)', 'tests.py', 'exec'))\n",
    # the guard's own finishing function, reached through the frames
    "frames": WRONG + "import sys\nf = sys._getframe()\nwhile f is not None:\n"
                      "    if 'finish' in f.f_locals:\n        f.f_locals['finish'](0)\n    f = f.f_back\n",
    # an object equal to everything
    "always_equal": "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                    "def add(a, b):\n    return Yes()\n",
    # an int subclass equal to everything
    "int_subclass": "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                    "def add(a, b):\n    return Yes(0)\n",
    # the tests' file read from the working dir and answered from
    "read_the_tests": "import glob, re\nseen = {}\nfor path in glob.glob('*.py') + glob.glob('/tmp/*/*.py'):\n"
                      "    for a, b, c in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', open(path).read()):\n"
                      "        seen[(int(a), int(b))] = int(c)\n"
                      "def add(a, b):\n    return seen[(a, b)]\n",
    # a builtin the tests use, redefined (and the real ones replaced for good measure)
    "builtins": "def double(xs):\n    return xs\ndef sorted(x):\n    return [2, 6]\nimport builtins\n"
                "builtins.isinstance = lambda *a: True\n",
}


@pytest.mark.parametrize("name", sorted(FAKES))
def test_a_fake_pass_is_judged_failed(name):
    tests = "assert sorted(double([3, 1])) == [2, 6]\n" if name == "builtins" else TESTS
    v = run_code(FAKES[name], tests, limits=SMALL)
    assert not v.passed, (name, v)


def test_a_module_the_tests_use_unimported_is_their_own_not_the_candidates():
    patched = "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n    return 0.0\n"
    tests = "assert math.isclose(area(1.0), 3.14159, rel_tol=1e-3)\n"  # relies on the candidate's import
    check(run_code(patched, tests, limits=SMALL), "failed")
    check(run_code("import math\ndef area(r):\n    return math.pi * r * r\n", tests, limits=SMALL), "passed")


def test_patching_the_test_framework_is_judged_failed():
    patched = ("import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\n"
               "unittest.TestCase.run = lambda self, result=None: None\n" + WRONG)
    v = run_code(patched, UNITTESTS, limits=SMALL)
    check(v, "failed")
    assert run_code(SOLUTION, UNITTESTS, limits=SMALL).passed


# --- writes outside the sandbox ------------------------------------------------------------------


def test_writes_through_stdlib_and_native_code_do_not_reach_the_host(tmp_path):
    existing = tmp_path / "victim.py"
    existing.write_text("print('mine')\n")
    new_db = tmp_path / f"new_{uuid.uuid4().hex}.db"
    attempts = [
        f"import sqlite3\nsqlite3.connect({str(new_db)!r}).execute('create table t(x)')\n",
        f"import readline\nreadline.add_history('import os')\nreadline.write_history_file({str(existing)!r})\n",
        f"import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.open({str(existing).encode()!r}, 0o1101)\n"
        "libc.write(fd, b'pwned', 5)\nassert fd >= 0, 'open failed'\n",
        f"import os\nos.truncate({str(existing)!r}, 0)\n",
        "import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.mkdir(b'/usr/escape', 0o755) == 0\n",
    ]
    for code in attempts:
        v = run_code(code + SOLUTION, TESTS, limits=SMALL)
        assert v.reason != "passed", (code, v)  # each fails at import time: nothing there to write to
        assert existing.read_text() == "print('mine')\n", code
        assert not new_db.exists(), code
        assert not os.path.exists("/usr/escape"), code


# --- reach over other processes -----------------------------------------------------------------


@pytest.fixture
def victim():
    """A process of the host, as the sandbox's user would see it (the same uid when not root)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_signals_and_limits_do_not_reach_another_process(victim):
    before = psutil.Process(victim.pid).rlimit(psutil.RLIMIT_NOFILE)
    attempts = [
        f"import os\nos.kill({victim.pid}, 9)\n",
        f"import os, signal\nfd = os.pidfd_open({victim.pid})\nsignal.pidfd_send_signal(fd, 9)\n",
        f"import resource\nresource.prlimit({victim.pid}, resource.RLIMIT_NOFILE, (3, 3))\n",
        f"import ctypes\nassert ctypes.CDLL(None).kill({victim.pid}, 9) == 0\n",
        "import os\nos.kill(-1, 9)\n",  # every process it may signal: only its own
    ]
    for code in attempts:
        v = run_code(code + SOLUTION, TESTS, limits=SMALL)
        assert not v.passed or "kill(-1" in code, (code, v)
        assert victim.poll() is None, code
        assert psutil.Process(victim.pid).rlimit(psutil.RLIMIT_NOFILE) == before, code


def test_its_own_verifier_is_out_of_reach():
    """The processes it can signal are its own sandbox's: a wrong answer still fails, a right one
    still passes (the namespace's init ignores a SIGKILL from inside), within the wall clock."""
    for attempt in ("os.kill(os.getppid(), 9)", "os.kill(1, 9)", f"os.kill({os.getpid()}, 9)", "os.killpg(0, 9)"):
        code = f"import os\ntry:\n    {attempt}\nexcept OSError:\n    pass\n"
        t = time.monotonic()
        v = run_code(code + WRONG, TESTS, limits=SMALL)
        assert not v.passed, (code, v)
        v = run_code(code + SOLUTION, TESTS, limits=SMALL)
        assert v.reason in ("passed", "incomplete"), (code, v)  # killpg(0): it ends itself
        assert time.monotonic() - t < 2 * SMALL.wall_seconds, code


# --- the wall clock and the process cap --------------------------------------------------------


def test_a_resessioned_child_holding_the_pipes_dies_with_the_run():
    survivor = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                "        while True:\n            sys.stdout.write('.'); sys.stdout.flush(); time.sleep(0.5)\n"
                "    os._exit(0)\n" + WRONG + "time.sleep(100)\n")
    t = time.monotonic()
    v = run_code(survivor, TESTS, limits=FAST)
    took = time.monotonic() - t
    check(v, "timeout")
    assert took < FAST.wall_seconds + 2, took  # 40 s against a 10 s limit on 86ff168


def test_forks_past_the_process_limit_are_refused():
    code = ("import os, time\nmade = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "            os._exit(0)\n        made += 1\nexcept OSError as e:\n    print('refused after', made, e)\n"
            + SOLUTION)
    v = run_code(code, TESTS, limits=SMALL)
    assert "refused after" in v.stdout_head, (v.reason, v.stdout_head, v.stderr_tail)
    made = int(v.stdout_head.split()[2])
    assert made <= SMALL.processes, made


# --- sockets ------------------------------------------------------------------------------------


def test_unix_and_tcp_listeners_on_the_host_get_no_connection(tmp_path):
    path = str(tmp_path / "listener.sock")
    unix, tcp = socket.socket(socket.AF_UNIX), socket.socket()
    accepted = []
    try:
        unix.bind(path)
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        for s in (unix, tcp):
            s.listen(8)
            s.settimeout(0.2)

        def serve(s):
            end = time.monotonic() + 20
            while time.monotonic() < end and not stop.is_set():
                try:
                    accepted.append(s.accept())
                except (TimeoutError, OSError):
                    pass

        stop = threading.Event()
        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in (unix, tcp)]
        for t in threads:
            t.start()
        for code in (f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\n",
                     f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
                     f"import socket\nsocket.create_connection(('::1', {port}), timeout=2)\n"):
            v = run_code(code + SOLUTION, TESTS, limits=SMALL)
            check(v, "error")
        stop.set()
        for t in threads:
            t.join()
        assert not accepted
    finally:
        unix.close()
        tcp.close()


# --- output and memory --------------------------------------------------------------------------


def test_a_hundred_megabytes_of_output_is_cut_at_the_cap():
    t = time.monotonic()
    v = run_code("import os\nos.write(1, b'x' * (100 << 20))\n" + SOLUTION, TESTS, limits=SMALL)
    check(v, "output_limit")
    assert time.monotonic() - t < SMALL.wall_seconds


def test_memory_bombs_in_many_processes_stay_under_the_cap():
    bomb = ("import os\nfor _ in range(8):\n    if os.fork() == 0:\n        break\n"
            "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n")
    v = run_code(bomb + SOLUTION, TESTS, limits=SMALL)
    assert not v.passed, v


def test_a_correct_solution_still_passes_after_all_that():
    check(run_code(SOLUTION, TESTS, limits=SMALL), "passed")
