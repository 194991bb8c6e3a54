"""The package layout keeps its contract (read from the source, nothing run):

- every stage of `config.STAGES` is `fusion_ray/<package>/stage.py` with `run(cfg, force=False, log=print)`,
  and there is no other `stage.py`;
- no module of one stage's package imports another stage's `stage` module (what stages share lives in
  a shared module: `io`, `schema`, `tokenizer`, ...);
- no module imports another package's private (`_underscore`) names, nor reaches them as attributes of a
  module it imported.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from fusion_ray.config import ALL_STAGES as STAGES
from fusion_ray.contract import STAGE_PACKAGES, StageResult
from fusion_ray.pipeline import runner

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("fusion_ray", "jobs", "bench", "tests")  # every Python file of the project
STAGE_PACKAGE_NAMES = {STAGE_PACKAGES.get(s, s) for s in STAGES}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def owner(module: str) -> str:
    """The unit that may use its own private names: a package below fusion_ray (`fusion_ray.collect`),
    a top-level module of fusion_ray (`fusion_ray.io`), or a top directory (`jobs`, `bench`, `tests`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fusion_ray" and len(parts) > 1 else parts[0]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(path: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(line, imported module, imported name or None, local name) of every import in a file;
    relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None, a.asname or a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, base, a.name, a.asname or a.name) for a in node.names]
    return out


def python_files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (REPO / top).rglob("*.py") if ".venv" not in p.parts)


def stage_import_violations(files: list[Path]) -> list[str]:
    """Modules of a stage package that import another stage package's `stage` module."""
    bad = []
    for path in files:
        mod = module_name(path)
        parts = mod.split(".")
        if parts[0] != "fusion_ray" or len(parts) < 3 or parts[1] not in STAGE_PACKAGE_NAMES:
            continue
        for line, module, name, _ in imports(path):
            target = f"{module}.{name}" if name else module
            segs = target.split(".")
            for i in range(len(segs) - 2):
                if segs[i] == "fusion_ray" and segs[i + 2] == "stage" and segs[i + 1] in STAGE_PACKAGE_NAMES \
                        and segs[i + 1] != parts[1]:
                    bad.append(f"{path.relative_to(REPO)}:{line}: imports {'.'.join(segs[:i + 3])}")
    return bad


def private_import_violations(files: list[Path]) -> list[str]:
    """Imports of another unit's private names (`from fusion_ray.x import _y`, a `_module`), and
    `module._name` on a module imported from another unit."""
    bad = []
    for path in files:
        mine = owner(module_name(path))
        modules: dict[str, str] = {}  # local name → the fusion_ray module it is bound to
        for line, module, name, local in imports(path):
            target = f"{module}.{name}" if name else module
            if not target.startswith("fusion_ray") or owner(target) == mine:
                continue
            if any(is_private(seg) for seg in target.split(".")):
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
            if name is None and local == module.split(".")[0]:
                continue  # `import fusion_ray.x.y` binds only `fusion_ray`
            modules[local] = target
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in modules and is_private(node.attr):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: uses {modules[node.value.id]}.{node.attr}")
    return bad


def test_each_stage_is_its_packages_stage_module_and_nothing_else_is():
    found = sorted(p.parent.name for p in (REPO / "fusion_ray").glob("*/stage.py"))
    assert found == sorted(STAGE_PACKAGE_NAMES), "fusion_ray/*/stage.py must be the stage list"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_exports_run_with_the_contract(stage):
    run = runner(stage)
    assert run.__module__ == f"fusion_ray.{STAGE_PACKAGES.get(stage, stage)}.stage"
    params = inspect.signature(run).parameters
    assert list(params) == ["cfg", "force", "log"], stage
    assert params["force"].default is False, stage
    # `print`, the builtin: Ray may have swapped `builtins.print` since the stage module was imported
    # (its tqdm_ray does in a driver that relays a worker's bar), so compare by what it is
    log = params["log"].default
    assert log is print or (getattr(log, "__module__", None), getattr(log, "__name__", None)) \
        == ("builtins", "print"), stage
    assert inspect.signature(run).return_annotation in ("StageResult", "-> StageResult"), stage


def test_a_stage_of_parts_is_skipped_only_when_every_part_was():
    done, skipped = StageResult("done", ["/w/a"], {"rows": 3}), StageResult.skipped("/w/b")
    assert StageResult.of_parts({"a": done, "b": skipped}).status == "done"
    both = StageResult.of_parts({"a": skipped, "b": StageResult.skipped("/w/c")})
    assert both.status == "skipped" and both.dirs == ["/w/b", "/w/c"]
    assert skipped.dir == "/w/b"
    with pytest.raises(ValueError, match="no single `dir`"):
        _ = both.dir


def test_stage_packages_do_not_import_each_others_stage_module():
    assert stage_import_violations(python_files()) == []


def test_no_module_imports_another_packages_private_names():
    assert private_import_violations(python_files()) == []


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The two AST checks find what they are for (files written into a scratch copy of the layout)."""
    import tests.test_layout as layout

    monkeypatch.setattr(layout, "REPO", tmp_path)
    (tmp_path / "fusion_ray" / "fuse").mkdir(parents=True)
    bad_stage = tmp_path / "fusion_ray" / "fuse" / "x.py"
    bad_stage.write_text("from fusion_ray.align.stage import Aligner\nfrom fusion_ray.align import stage\n"
                         "from fusion_ray.fuse import stage as own\nimport fusion_ray.evaluate.stage\n")
    assert len(layout.stage_import_violations([bad_stage])) == 3
    bad_private = tmp_path / "fusion_ray" / "fuse" / "y.py"
    bad_private.write_text("from fusion_ray.engines.scoring import _hidden\nfrom fusion_ray.engines import scoring as engines\n"
                           "from fusion_ray.fuse.strategies import _own\nengines._hidden()\n")
    assert [v.split(": ", 1)[1] for v in layout.private_import_violations([bad_private])] == [
        "imports fusion_ray.engines.scoring._hidden", "uses fusion_ray.engines.scoring._hidden"]
