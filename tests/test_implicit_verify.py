"""Rule verifiers of the implicit-fusion reward stage: math answers and the code verifier under
bubblewrap (unit tier: no Ray; each run starts two sandboxes). The hostile candidates of issue #34
are in test_sandbox_hostile.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from sandbox_helpers import SMALL, SOLUTION, TESTS, check, no_leftovers  # noqa: F401 - an autouse fixture

from fusion_ray.config import parse_config
from fusion_ray.reward import sandbox
from fusion_ray.reward.verify import (
    SandboxLimits,
    SandboxSettings,
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
# the sandbox: what the in-process guard's tests asked, now of bubblewrap and the outside verdict
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_correct_solution_passes_and_wrong_one_fails():
    check(run_code(SOLUTION, TESTS), "passed")
    v = run_code("def add(a, b):\n    return a - b\n", TESTS)
    check(v, "failed")
    assert v.cases == 2 and v.failed_cases == 2 and v.detail.startswith("AssertionError")
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
    v = run_code(SOLUTION, unittest_tests)
    check(v, "passed")
    assert v.cases == 1, "the test method is the case; unittest.main() is not one"
    check(run_code("def add(a, b):\n    return 0\n", unittest_tests), "failed")


@pytest.mark.timeout(60)
def test_tests_without_a_case_never_pass():
    check(run_code(SOLUTION, "import math\nx = add(1, 2)\n"), "no_tests")
    check(run_code(SOLUTION, "import unittest\nunittest.main()\n"), "no_tests")
    check(run_code(SOLUTION, "import no_such_module\nassert add(1, 2) == 3\n"), "tests_error")


@pytest.mark.timeout(60)
def test_classes_and_plain_data_cross_but_other_objects_stay_handles():
    code = ("class Node:\n    def __init__(self, v, nxt=None):\n        self.val, self.next = v, nxt\n"
            "class Solution:\n    def pair(self, x):\n        return (x, {x: [x]})\n"
            "    def chain(self, n):\n        return Node(n, Node(n + 1))\n")
    tests = ("s = Solution()\nassert s.pair(2) == (2, {2: [2]})\nassert s.pair(b'x') == (b'x', {b'x': [b'x']})\n"
             "node = s.chain(4)\nassert node.val == 4 and node.next.val == 5 and node.next.next is None\n"
             "assert node != node.next\n")
    v = run_code(code, tests)
    check(v, "passed")
    assert v.cases == 4


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
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


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
@pytest.mark.timeout(60)
def test_fork_bombs_are_contained_and_leave_no_process():
    v = run_code("import os\nwhile True:\n    os.fork()\n", TESTS, limits=SMALL)
    assert not v.passed, v
    stubborn = ("import os, subprocess, multiprocessing\nwhile True:\n"
                "    for f in (os.fork, lambda: subprocess.Popen(['sleep', '100']), lambda: os.system('sleep 100'),\n"
                "              lambda: os.posix_spawn('/bin/sleep', ['sleep', '100'], {}),\n"
                "              lambda: multiprocessing.Process(target=print).start()):\n"
                "        try:\n            f()\n        except Exception:\n            pass\n")
    v = run_code(stubborn, TESTS, limits=SMALL)
    assert not v.passed, v
    # (no_leftovers: no sandbox process is alive after either)


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
@pytest.mark.timeout(60)
def test_memory_hogs_fail_without_exceeding_the_limit():
    v = run_code("x = bytearray(10**10)\n", TESTS, limits=SMALL)
    check(v, "memory")
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(100 * 2**20))\n    print(len(chunks), flush=True)\n"
    v = run_code(hog, TESTS, limits=SMALL)
    check(v, "memory")
    held = [int(n) for n in v.stdout_head.split()]
    assert held and max(held) * 100 * 2**20 <= SMALL.memory_bytes, held  # never more than the limit


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
@pytest.mark.timeout(60)
def test_writes_land_in_the_sandboxes_own_tmpfs_only(tmp_path):
    targets = [f"/tmp/sandbox_escape_{uuid.uuid4().hex}", str(tmp_path / "escape")]
    for target in targets:
        attempts = [
            f"open({target!r}, 'w').write('x')\n",
            f"import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
            f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')\n",
            f"import pathlib\npathlib.Path({target!r}).write_text('x')\n",
            f"import os\nos.mkdir({target!r})\n",
            f"import os\nos.system('touch {target}')\n",
            f"import subprocess\nsubprocess.run(['touch', {target!r}])\n",
        ]
        for code in attempts:
            v = run_code(code, TESTS, limits=SMALL)
            assert not v.passed, (code, v)
            assert not os.path.lexists(target), code
    # its own /tmp is writable, and gone afterwards
    name = f"scratch_{uuid.uuid4().hex}.txt"
    v = run_code(f"import os\nopen({name!r}, 'w').write('ok')\nos.mkdir('d')\nprint(os.getcwd())\n" + SOLUTION,
                 TESTS, limits=SMALL)
    check(v, "passed")
    assert v.stdout_head.strip() == "/tmp" and not os.path.exists(f"/tmp/{name}")


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
@pytest.mark.timeout(60)
def test_no_network_and_the_listener_sees_no_connection():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        ]
        for code in attempts:
            v = run_code(code + SOLUTION, TESTS, limits=SMALL)
            check(v, "error")
            assert "ConnectionRefusedError" in v.stderr_tail or "URLError" in v.stderr_tail, v.stderr_tail
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
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
def test_large_file_is_bounded_by_the_file_size_limit():
    v = run_code("open('big', 'wb').write(b'x' * (8 * 2**20))\n" + SOLUTION, TESTS, limits=SMALL)
    assert not v.passed and "File too large" in v.stderr_tail, (v.reason, v.stderr_tail)


@pytest.mark.integration  # seconds of sandboxes each: not the unit tier
@pytest.mark.timeout(60)
def test_verdicts_stay_correct_across_a_sequence_with_hostile_code():
    hostile = ["while True:\n    pass\n", "x = bytearray(10**10)\n", "import os\nwhile True:\n    os.fork()\n",
               "while True:\n    print('y' * 4096)\n"]
    for bad in hostile:
        assert run_code(SOLUTION, TESTS, limits=SMALL).passed
        v = run_code(bad + SOLUTION, TESTS, limits=SMALL)
        assert not v.passed
        assert not run_code("def add(a, b):\n    return a * b\n", TESTS, limits=SMALL).passed
    assert run_code(SOLUTION, TESTS, limits=SMALL).passed


# ---------------------------------------------------------------------------------------------
# where bubblewrap cannot run; the unsafe guard, kept for tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_without_a_runnable_sandbox_verification_refuses_in_one_line(tmp_path):
    from fusion_ray.reward.stage import sandbox_problem

    missing = SandboxSettings(python=str(tmp_path / "no-python"))
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        run_code(SOLUTION, TESTS, settings=missing)
    assert "\n" not in str(err.value) and "no-python: not found" in str(err.value)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "add"}], "tests": "assert add(1, 2) == 3"}\n')
    cfg = {"name": "x", "method": "implicit", "workdir": str(tmp_path / "w"),
           "pivot": {"name": "p", "path": "demo:implicit_pivot"},
           "sources": [{"name": "s", "path": "demo:implicit_pivot"}],
           "implicit": {"prompts": [{"path": str(prompts), "verify": "code"}],
                        "sandbox": {"python": str(tmp_path / "no-python")}}}
    why = sandbox_problem(parse_config(cfg))
    assert why and "\n" not in why and "bubblewrap" in why and "isolation=unsafe-in-process" in why
    cfg["implicit"]["heldout"] = [{"path": str(prompts), "verify": "code"}]
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "fusion_ray.cli", "validate", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [f"{tmp_path / 'c.yaml'}: {why}"]
    cfg["implicit"]["sandbox"]["isolation"] = "unsafe-in-process"
    assert sandbox_problem(parse_config(cfg)) is None


@pytest.mark.timeout(60)
def test_the_unsafe_in_process_guard_still_judges_plain_code():
    check(run_code(SOLUTION, TESTS, isolation="unsafe-in-process"), "passed")
    check(run_code("def add(a, b):\n    return a - b\n", TESTS, isolation="unsafe-in-process"), "failed")
    with pytest.raises(ValueError, match="isolation 'none'"):
        run_code(SOLUTION, TESTS, isolation="none")


@pytest.mark.timeout(60)
def test_a_cgroup_it_may_not_join_falls_back_to_rlimits(monkeypatch):
    """cgroup v2 may let a process make a group it may not move into: the run goes on under the
    rlimits alone, and the group it made is removed (no_leftovers)."""
    def refuse(procs):
        if procs:
            raise PermissionError("cgroup.procs: not delegated")

    monkeypatch.setattr(sandbox.Cgroup, "join", staticmethod(refuse))
    check(run_code(SOLUTION, TESTS), "passed")
    check(run_code("while True:\n    pass\n", TESTS, limits=SMALL), "timeout")
