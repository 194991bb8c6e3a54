"""Rule verifiers of the implicit-fusion reward stage: math answers and the code sandbox (unit tier)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid

import psutil
import pytest

from fusion_ray.implicit.verify import (
    SandboxLimits,
    Verdict,
    extract_answer,
    math_correct,
    normalize_answer,
    run_code,
    verify_code,
)

# ---------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------

MATH_CASES = [
    ("So the result is \\boxed{42}.", "42", True),
    ("We get \\boxed{\\frac{1}{2}} in the end.", "0.5", True),
    ("First \\boxed{3}, corrected: \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\left(1, \\{2\\}\\right)}", "(1,\\{2\\})", True),  # nested braces, \left/\right
    ("\\boxed{{12}}", "12", True),
    ("The answer is 42.", "42", True),
    ("The answer is 42. Other numbers: 7", "42", True),
    ("Answer: $-3$", "−3", True),  # unicode minus in the gold
    ("so x = 5\n#### 1,234", "1234", True),
    ("#### 1,234", "1234.0", True),
    ("Answer: 0.50", "1/2", True),
    ("Answer: .5", "\\frac{1}{2}", True),
    ("Answer: 12.0", "12", True),
    ("Answer: \\text{12 apples}", "12apples", True),
    ("The total is 3 + 4 = 7 dollars", "7", True),  # last number
    ("x = 5", "5", True),
    ("Answer: -2/4", "-0.5", True),
    ("Answer: 12", "120", False),  # shares digits
    ("Answer: 120", "12", False),
    ("\\boxed{1/3}", "0.33", False),
    ("Answer: 3", "-3", False),
    ("I do not know.", "42", False),  # no answer at all
    ("", "0", False),
    ("The answer is \\boxed{7}", "Solution ... so \\boxed{7}", True),  # gold as a worked solution
    ("The answer is 18", "Janet sells 16 - 3 - 4 = 9 eggs...\n#### 18", True),
    ("The answer is 17", "Janet ...\n#### 18", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), MATH_CASES)
def test_math_correct_table(response, gold, expected):
    assert math_correct(response, gold) is expected


def test_extract_answer_prefers_the_last_balanced_box_and_returns_none_without_an_answer():
    assert extract_answer("\\boxed{a} then \\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("\\boxed{unbalanced") == "unbalanced" or extract_answer("\\boxed{unbalanced") is None
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is: 7") == "7"


def test_normalize_answer_canonical_forms():
    assert normalize_answer("$1,234.$") == "1234"
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("0.50") == normalize_answer(".5") == "1/2"
    assert normalize_answer("−3") == normalize_answer("-3.0") == "-3"
    assert normalize_answer("\\text{ cm }") == "cm"
    assert normalize_answer("1,2") == "1,2"  # a list, not a thousands separator


# ---------------------------------------------------------------------------------------------
# the sandbox
# ---------------------------------------------------------------------------------------------

SMALL = SandboxLimits(cpu_seconds=2, wall_seconds=8, memory_bytes=256 * 1024 * 1024, output_bytes=16 * 1024)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def sandbox_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("fr_sandbox_")}


def sandbox_processes() -> list[psutil.Process]:
    """Live descendants of this process that a sandbox run started (their command line names its
    `fr_sandbox_` dir). Other descendants (a session's Ray, started by other test modules) are not ours."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("fr_sandbox_" in a for a in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every sandbox test: no sandbox dir and no sandbox process left afterwards."""
    before = sandbox_dirs()
    yield
    assert sandbox_dirs() <= before
    alive = sandbox_processes()
    assert not alive, alive


def check(v: Verdict, reason: str) -> None:
    assert v.reason == reason, (v.reason, v.returncode, v.stderr_tail)
    assert v.passed is (reason == "passed")


@pytest.mark.timeout(60)
def test_correct_solution_passes_and_wrong_one_fails():
    check(run_code(SOLUTION, TESTS), "passed")
    check(run_code("def add(a, b):\n    return a - b\n", TESTS), "failed")
    v = run_code("def add(a, b):\n    return a +\n", TESTS)
    check(v, "syntax")
    assert "SyntaxError" in v.stderr_tail


@pytest.mark.timeout(60)
def test_verify_code_takes_the_last_python_block():
    response = ("Here is a draft:\n```python\ndef add(a, b):\n    return 0\n```\nFixed:\n"
                "```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    check(verify_code(response, TESTS), "passed")
    check(verify_code("```\ndef add(a, b):\n    return a + b\n```", TESTS), "passed")
    check(verify_code(SOLUTION, TESTS), "passed")  # no fence: the whole text
    check(verify_code("```python\ndef add(a, b):\n    return 1\n```", TESTS), "failed")


@pytest.mark.timeout(60)
def test_exiting_before_the_tests_does_not_pass():
    check(run_code("import os\nos._exit(0)\n" + SOLUTION, TESTS), "incomplete")
    assert not run_code("import sys\nsys.exit(0)\n" + SOLUTION, TESTS).passed
    assert not run_code("import sys\ndef add(a, b):\n    sys.exit(0)\n", TESTS).passed
    unittest_tests = ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
                      "        self.assertEqual(add(2, 3), 5)\nunittest.main()\n")
    check(run_code(SOLUTION, unittest_tests), "passed")
    check(run_code("def add(a, b):\n    return 0\n", unittest_tests), "failed")


@pytest.mark.timeout(60)
def test_endless_loop_times_out_within_the_limits():
    t = time.monotonic()
    v = run_code("while True:\n    pass\n", TESTS, limits=SMALL)
    check(v, "timeout")
    assert time.monotonic() - t < SMALL.wall_seconds + 5
    t = time.monotonic()  # sleeping uses no CPU: the wall clock ends it
    v = run_code("import time\ntime.sleep(100)\n", TESTS, limits=SandboxLimits(wall_seconds=2))
    check(v, "timeout")
    assert 1.5 < time.monotonic() - t < 2 + 5


@pytest.mark.timeout(60)
def test_fork_bomb_is_contained_and_leaves_no_process():
    code = "import os\nprint(os.getpgrp(), flush=True)\nwhile True:\n    os.fork()\n"
    v = run_code(code, TESTS, limits=SMALL)
    assert not v.passed and v.reason == "blocked", (v.reason, v.stderr_tail)
    pgid = int(v.stdout_head.split()[0])
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    # a bomb that swallows the refusals and keeps trying, through every door
    stubborn = ("import os, subprocess, multiprocessing\nprint(os.getpgrp(), flush=True)\nwhile True:\n"
                "    for f in (os.fork, lambda: subprocess.Popen(['sleep', '100']), lambda: os.system('sleep 100'),\n"
                "              lambda: os.posix_spawn('/bin/sleep', ['sleep', '100'], {}),\n"
                "              lambda: multiprocessing.Process(target=print).start()):\n"
                "        try:\n            f()\n        except Exception:\n            pass\n")
    v = run_code(stubborn, TESTS, limits=SMALL)
    assert not v.passed
    if v.stdout_head.strip():
        with pytest.raises(ProcessLookupError):
            os.killpg(int(v.stdout_head.split()[0]), 0)


@pytest.mark.timeout(60)
def test_memory_hogs_fail_without_exceeding_the_limit():
    v = run_code("x = bytearray(10**10)\n", TESTS, limits=SMALL)
    check(v, "memory")
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(100 * 2**20))\n    print(len(chunks), flush=True)\n"
    v = run_code(hog, TESTS, limits=SMALL)
    check(v, "memory")
    held = [int(n) for n in v.stdout_head.split()]
    assert held and max(held) * 100 * 2**20 <= SMALL.memory_bytes, held  # never more than the limit


@pytest.mark.timeout(60)
def test_writing_outside_the_working_dir_is_blocked():
    target = f"/tmp/sandbox_escape_{uuid.uuid4().hex}"
    attempts = [
        f"open({target!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nd = os.open('/tmp', os.O_RDONLY)\nos.close(os.open({target.split('/')[-1]!r}, "
        "os.O_WRONLY | os.O_CREAT, dir_fd=d))\n",
        f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')\n",
        f"import pathlib\npathlib.Path({target!r}).write_text('x')\n",
        f"import os\nos.mkdir({target!r})\n",
        f"import shutil\nshutil.copy('solution.py', {target!r})\n",
    ]
    for code in attempts:
        v = run_code(code, TESTS, limits=SMALL)
        assert not v.passed and v.reason == "blocked", (code, v.reason, v.stderr_tail)
        assert not os.path.lexists(target), code
    # inside its own dir it may write, and the dir is gone afterwards
    v = run_code("import os\nopen('scratch.txt', 'w').write('ok')\nos.mkdir('d')\nprint(os.getcwd())\n" + SOLUTION,
                 TESTS, limits=SMALL)
    check(v, "passed")
    assert v.stdout_head.strip() and not os.path.exists(v.stdout_head.strip())


@pytest.mark.timeout(60)
def test_sockets_are_blocked_and_the_listener_sees_no_connection():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        ]
        for code in attempts:
            v = run_code(code, TESTS, limits=SMALL)
            assert not v.passed and v.reason == "blocked", (code, v.reason, v.stderr_tail)
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.timeout(60)
def test_endless_printing_is_cut_at_the_output_cap():
    t = time.monotonic()
    v = run_code("while True:\n    print('x' * 1000)\n", TESTS, limits=SMALL)
    check(v, "output_limit")
    assert len(v.stdout_head) <= 2048 and len(v.stderr_tail) <= 2048
    assert time.monotonic() - t < SMALL.wall_seconds
    v = run_code("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)\n", TESTS, limits=SMALL)
    check(v, "output_limit")
    assert len(v.stderr_tail) <= 2048


@pytest.mark.timeout(60)
def test_shell_commands_are_blocked():
    target = f"/tmp/sandbox_touch_{uuid.uuid4().hex}"
    for code in (f"import os\nos.system('touch {target}')\n",
                 f"import subprocess\nsubprocess.run(['touch', {target!r}])\n",
                 f"import os\nos.execv('/usr/bin/touch', ['touch', {target!r}])\n"):
        v = run_code(code, TESTS, limits=SMALL)
        assert not v.passed and v.reason == "blocked", (code, v.reason, v.stderr_tail)
        assert not os.path.exists(target)


@pytest.mark.timeout(60)
def test_large_file_is_bounded_by_the_file_size_limit():
    v = run_code("open('big', 'wb').write(b'x' * (8 * 2**20))\n" + SOLUTION, TESTS, limits=SMALL)
    assert not v.passed and "File too large" in v.stderr_tail, (v.reason, v.stderr_tail)


@pytest.mark.timeout(60)
def test_verdicts_stay_correct_across_a_sequence_with_hostile_code():
    hostile = ["while True:\n    pass\n", "x = bytearray(10**10)\n", "import os\nos.fork()\n",
               "while True:\n    print('y' * 4096)\n"]
    for bad in hostile:
        assert run_code(SOLUTION, TESTS, limits=SMALL).passed
        v = run_code(bad + SOLUTION, TESTS, limits=SMALL)
        assert not v.passed
        assert not run_code("def add(a, b):\n    return a * b\n", TESTS, limits=SMALL).passed
    assert run_code(SOLUTION, TESTS, limits=SMALL).passed
