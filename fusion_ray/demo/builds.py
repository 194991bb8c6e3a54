"""Building the demo assets once per machine: the explicit default (`build.py`) and the
implicit one (`build_implicit.py`), each into its own cache dir under a file lock.

Each part (corpus, each model) is published atomically, so an interrupted build resumes with the
parts it finished; `build.json`, written last, records sizes and timings and marks the build done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from fusion_ray.demo import assets, implicit
from fusion_ray.locations import file_lock


def ensure_assets(spec: assets.DemoSpec = assets.DEFAULT_SPEC, log=print) -> Path:
    """Build whatever explicit-default assets are missing and return their root."""
    def build_all(*args, **kwargs):
        from fusion_ray.demo.build import build_all  # heavy: torch, transformers

        return build_all(*args, **kwargs)

    return build_once(assets.assets_dir(spec), build_all, spec, log)


def ensure_implicit(spec: implicit.ImplicitSpec = implicit.DEFAULT_SPEC, log=print) -> Path:
    """Build whatever implicit-default assets are missing and return their root."""
    def build_all(*args, **kwargs):
        from fusion_ray.demo.build_implicit import build_all  # heavy: torch, transformers

        return build_all(*args, **kwargs)

    return build_once(implicit.assets_dir(spec), build_all, spec, log)


def build_once(root: Path, build_all: Callable[..., dict], spec, log=print) -> Path:
    """`build_all(spec, root, log=log)` unless `root/build.json` exists, under a file lock; its
    summary, with the build's wall time, becomes `build.json` (written last: the build is done)."""
    if (root / "build.json").exists():
        return root
    with file_lock(root):
        if not (root / "build.json").exists():
            started = time.monotonic()
            summary = build_all(spec, root, log=log)
            summary["build_seconds"] = round(time.monotonic() - started, 1)
            (root / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return root
