"""The code verifier's throughput: bubblewrap with the verdict outside (`isolation="bwrap"`, two
sandboxes a response) against the in-process guard it replaced (`"unsafe-in-process"`), on the
same candidates at the same parallelism, in one run.

The candidates: correct solutions, wrong ones, and hostile ones written to be judged correct
while wrong (a SystemExit(0) under the tests' file name, the guard's finishing function reached
through the frames, an object equal to everything, answers read from the tests' file, a patched
`unittest`) or to cost time (an endless loop, a memory bomb, a flood of output). Each isolation
verifies every candidate `--rounds` times on a pool of `--parallel` threads (the reward stage runs
one verifier per actor; threads here stand for actors).

Usage: python bench/verify.py [--rounds 3] [--parallel 2]
Last line: one JSON object: `bwrap_per_s`, `guard_per_s` (verified responses per second),
`ratio` (bwrap over guard), `parallel`, `responses`, `fooled` ({isolation: hostile candidates
judged passed}), `wrong_verdicts` ({isolation: correct ones failed or wrong ones passed}) and
`setup_s` (median time of one bubblewrap start with a trivial program: the floor per sandbox).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from fusion_ray.reward.sandbox import Sandbox, SandboxLimits, SandboxSettings, interpreter
from fusion_ray.reward.verify import run_code

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=4, memory_bytes=256 << 20, output_bytes=16 << 10)
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(10, 5) == 15\n"
UNITTESTS = ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
             "        self.assertEqual(add(2, 3), 5)\nunittest.main()\n")
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
CANDIDATES = [  # (label, code, tests, kind): kind "right" must pass, the rest must not
    ("right", RIGHT, TESTS, "right"),
    ("right_loop", "def add(a, b):\n    s = a\n    for _ in range(b if b > 0 else 0):\n        s += 1\n"
                   "    return s if b >= 0 else a + b\n", TESTS, "right"),
    ("right_unittest", RIGHT, UNITTESTS, "right"),
    ("wrong", WRONG, TESTS, "wrong"),
    ("wrong_unittest", WRONG, UNITTESTS, "wrong"),
    ("exit_as_tests", WRONG + "exec(compile('raise SystemExit(0)', 'tests.py', 'exec'))\n", TESTS, "hostile"),
    ("frames", WRONG + "import sys\nf = sys._getframe()\nwhile f is not None:\n    if 'finish' in f.f_locals:\n"
                       "        f.f_locals['finish'](0)\n    f = f.f_back\n", TESTS, "hostile"),
    ("always_equal", "class E:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return E()\n",
     TESTS, "hostile"),
    ("read_tests", "import re\ntry:\n    src = open('tests.py').read()\nexcept OSError:\n    src = ''\n"
                   "facts = re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', src)\n"
                   "known = {(int(a), int(b)): int(c) for a, b, c in facts}\n"
                   "def add(a, b):\n    return known[(a, b)]\n", TESTS, "hostile"),
    ("patch_unittest", "import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\n" + WRONG,
     UNITTESTS, "hostile"),
    ("loop", "while True:\n    pass\n", TESTS, "hostile"),
    ("memory", "x = bytearray(10**10)\n", TESTS, "hostile"),
    ("flood", "while True:\n    print('x' * 4096)\n", TESTS, "hostile"),
]


def run(isolation: str, rounds: int, parallel: int) -> tuple[float, int, int, int]:
    """(seconds, responses, hostile judged passed, wrong verdicts on right/wrong ones)."""
    jobs = [c for _ in range(rounds) for c in CANDIDATES]
    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        verdicts = list(pool.map(lambda c: run_code(c[1], c[2], limits=LIMITS, isolation=isolation), jobs))
    seconds = time.monotonic() - started
    judged = list(zip(jobs, verdicts, strict=True))
    fooled = sum(v.passed for (_, _, _, kind), v in judged if kind == "hostile")
    wrong = sum(v.passed != (kind == "right") for (_, _, _, kind), v in judged if kind != "hostile")
    for (label, _, _, kind), v in judged[: len(CANDIDATES)]:
        print(f"  {isolation:18s} {label:15s} {kind:8s} → {v.reason} ({v.seconds:.2f} s)")
    return seconds, len(jobs), fooled, wrong


def setup_floor(n: int = 10) -> float:
    python = interpreter(SandboxSettings())
    times = []
    for _ in range(n):
        t = time.monotonic()
        Sandbox([python, "-I", "-S", "-c", "pass"], LIMITS, SandboxSettings()).wait()
        times.append(time.monotonic() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    floor = setup_floor()
    print(f"one bubblewrap sandbox running `python -I -S -c pass`: median {floor * 1000:.0f} ms")
    result = {}
    for isolation in ("unsafe-in-process", "bwrap"):
        seconds, n, fooled, wrong = run(isolation, args.rounds, args.parallel)
        result[isolation] = (n / seconds, fooled, wrong)
        print(f"{isolation}: {n} responses in {seconds:.1f} s ({n / seconds:.2f}/s) at {args.parallel} in parallel; "
              f"hostile judged passed: {fooled}; right/wrong misjudged: {wrong}")
    ratio = result["bwrap"][0] / result["unsafe-in-process"][0]
    print(f"bwrap / guard throughput: {ratio:.2f}x")
    print(json.dumps({"bwrap_per_s": round(result["bwrap"][0], 3),
                      "guard_per_s": round(result["unsafe-in-process"][0], 3), "ratio": round(ratio, 3),
                      "parallel": args.parallel, "responses": len(CANDIDATES) * args.rounds,
                      "fooled": {k: v[1] for k, v in result.items()},
                      "wrong_verdicts": {k: v[2] for k, v in result.items()}, "setup_s": round(floor, 4)}))


if __name__ == "__main__":
    main()
