"""The README's code blocks: each shell or Python block is either run by CI (`.ci/run` →
`.ci/readme.py run`) exactly as written, or visibly marked `# needs …` on its first line; a block
CI runs works on a fresh clone (no bare `fusion-ray`: it is not on PATH before the venv is
activated; only make targets and `fusion-ray` commands that exist)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ci_readme", REPO / ".ci" / "readme.py")
readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme)


def test_ci_runs_the_readme_blocks_then_the_suite():
    run = (REPO / ".ci" / "run").read_text()
    steps = [line for line in run.splitlines() if line and not line.startswith(("#", "set ", "cd ", "echo", "start="))]
    assert steps.index("python3 .ci/readme.py run") < next(i for i, s in enumerate(steps) if s.endswith("make test"))


def test_every_block_is_run_or_marked():
    found = readme.blocks((REPO / "README.md").read_text())
    run = [body for _, body, why in found if why is None]
    assert any("make demo" in b and "make test" in b for b in run), "the two commands"
    assert any("fusechat3_tiny.yaml" in b for b in run), "the implicit default"
    assert any(readme.SERVE.match(line.strip()) for b in run for line in b.splitlines()), "serve"
    assert any("from openai import OpenAI" in b for b in run), "the client"


def test_blocks_ci_runs_work_on_a_fresh_clone():
    from fusion_ray.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for lang, body, why in readme.blocks((REPO / "README.md").read_text()):
        if why is not None or lang != "bash":
            continue
        for line in body.splitlines():
            words = line.split("#")[0].split()
            if not words:
                continue
            assert words[0] != "fusion-ray", f"not on PATH on a fresh clone: {line}"
            if words[0] == ".venv/bin/fusion-ray":
                assert words[1] in commands, line
            if words[0] == "make":
                assert words[1] in targets, line


def test_a_block_marked_needs_is_skipped_and_an_unmarked_one_is_run():
    text = "```bash\n# needs a GPU cluster\nrun-me\n```\n\n```python\nprint(1)\n```\n\n```yaml\na: 1\n```\n"
    assert [(lang, why) for lang, _, why in readme.blocks(text)] == [("bash", "needs a GPU cluster"), ("python", None)]
