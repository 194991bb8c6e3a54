"""Shared by the code-verifier tests: the small limits, a solution and its tests, and a check that
a run left nothing behind (no process of the sandbox's user, no cgroup, no scratch dir)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fusion_ray.reward.sandbox import NOBODY, SandboxLimits
from fusion_ray.reward.verify import Verdict

SMALL = SandboxLimits(cpu_seconds=2, wall_seconds=8, memory_bytes=256 * 1024 * 1024, output_bytes=16 * 1024)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def check(v: Verdict, reason: str) -> None:
    assert v.reason == reason, (v.reason, v.returncode, v.detail, v.stderr_tail)
    assert v.passed is (reason == "passed")


def sandbox_processes() -> list[psutil.Process]:
    """Live processes a sandbox could have left: the sandbox user's (a root verifier drops to it),
    else this process's descendants running bubblewrap or the in-process guard."""
    found = []
    procs = psutil.process_iter() if os.geteuid() == 0 else psutil.Process().children(recursive=True)
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if (os.geteuid() == 0 and p.uids().real == NOBODY) or any(
                    "bwrap" in a or "fr_sandbox_" in a for a in p.cmdline()[:3]):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def sandbox_cgroups() -> list[Path]:
    return [d for d in Path("/sys/fs/cgroup").glob("**/fusion_ray_sandbox/*") if d.is_dir()]


def scratch_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("fr_sandbox_")}


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test: afterwards no sandbox process is alive, no run's cgroup or scratch dir is left."""
    before = scratch_dirs()
    assert not sandbox_processes(), "a sandbox process was alive before the test"
    yield
    deadline = time.monotonic() + 3  # the kernel tears a pid namespace down asynchronously
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = sandbox_processes()
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    assert not sandbox_cgroups()
    assert scratch_dirs() <= before
