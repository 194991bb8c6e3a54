#!/usr/bin/env python3
"""Run the README's code blocks as a newcomer would copy them, from the repo root.

  python3 .ci/readme.py list          every shell/Python block: run by CI, or why not
  python3 .ci/readme.py run           run each block CI runs, in README order (`make test` aside:
                                      .ci/run runs it last, after these)
  python3 .ci/readme.py check-report  the inequalities the README states on the demo's report

Rules: a ```bash or ```python block whose first line is a comment starting with `# needs` (a GPU
cluster, your models, a judge endpoint) is shown to the reader as not runnable here and is
skipped; every other one is run. The bash blocks run in one shell session, in order (an
`export` carries over); a `fusion-ray serve` line starts in the background and the next blocks
run once its /health answers; the server is stopped at the end. Standard library only: this
runs before the venv exists.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
DEFERRED = {"make test"}  # .ci/run runs the suite last
SERVE = re.compile(r"^(?:\S*/)?fusion-ray serve .*--port (\d+)")
# The README's claims about the demo's report (tests/test_pipeline_job.py asserts the same on its run).
BPB_TOLERANCE = 3 * 0.0008


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, why it is not run or None) of each shell/Python block."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in RUN_LANGS:
            continue
        first = body.lstrip().splitlines()[0] if body.strip() else ""
        out.append((RUN_LANGS[lang], body, first[1:].strip() if first.startswith("# needs") else None))
    return out


def cmd_list() -> int:
    for i, (lang, body, why) in enumerate(blocks((REPO / "README.md").read_text())):
        head = body.strip().splitlines()[0]
        print(f"{i:2d} {lang:6s} {'skip: ' + why if why else 'run'}  | {head[:70]}")
    return 0


def wait_for_health(port: int, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"readme: the server exited ({server.returncode}) before it answered /health")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"readme: nothing answered http://127.0.0.1:{port}/health in {timeout:.0f}s")


def cmd_run() -> int:
    env = dict(os.environ)
    servers: list[subprocess.Popen] = []
    try:
        for i, (lang, body, why) in enumerate(blocks((REPO / "README.md").read_text())):
            if why:
                continue
            print(f"readme: block {i} ({lang})", flush=True)
            if lang == "python":
                subprocess.run([str(REPO / ".venv/bin/python"), "-c", body], cwd=REPO, env=env, check=True)
                continue
            lines = [line for line in body.splitlines() if line.split("#")[0].strip() not in DEFERRED]
            serve = [(j, m) for j, line in enumerate(lines) if (m := SERVE.match(line.strip()))]
            with tempfile.NamedTemporaryFile("r", suffix=".env") as dump:
                script = "\n".join(lines[:serve[0][0]] if serve else lines) + f"\nenv -0 > {dump.name}\n"
                subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, check=True)
                env = dict(item.split("=", 1) for item in dump.read().split("\0") if "=" in item)
            if serve:
                j, match = serve[0]
                servers.append(subprocess.Popen(["bash", "-c", lines[j]], cwd=REPO, env=env, start_new_session=True))
                wait_for_health(int(match.group(1)), servers[-1])
                print(f"readme: block {i}: the server answers /health", flush=True)
        return 0
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def cmd_check_report(path: str = "runs/tiny_cpu/report/report.json") -> int:
    report = json.loads((REPO / path).read_text())
    bpb, problems = report["bpb"], []
    for source, domain in report["source_domain"].items():
        if not bpb[f"fused:{source}"][domain] < bpb["clm_only"][domain] - BPB_TOLERANCE:
            problems.append(f"fused:{source} does not beat clm_only on {domain}")
    for domain, value in bpb["clm_only"].items():
        if not bpb["merged"][domain] <= value + BPB_TOLERANCE:
            problems.append(f"merged is worse than clm_only on {domain}")
    for p in problems:
        print(f"readme: {path}: {p}", file=sys.stderr)
    if not problems:
        print(f"readme: {path}: each fused arm beats clm_only on its domain, merged no worse anywhere")
    return 1 if problems else 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["list"]
    sys.exit({"list": cmd_list, "run": cmd_run, "check-report": cmd_check_report}[command](*rest))
