"""The package layout keeps its contract (read from the source, nothing run).

Three layers: the shared modules (everything below that is not a stage package or the top),
the stage packages (`fusion_ray/<package>/`, one per stage of `config.ALL_STAGES`), and the top
(`pipeline`, `cli`, `demo/` and the package `__init__`), which alone may import stages.

- every stage of `config.ALL_STAGES` is `fusion_ray/<package>/stage.py` with `run(cfg, force=False,
  log=print)`, and there is no other `stage.py`;
- no module of a stage package imports any module of another stage package (what two stages
  share lives in a shared module: `engines/`, `checkpoint/`, `trainer/`, `chat_template`, ...);
- no shared module imports a stage package or the top (`SHARED_EXCEPTIONS` names the one that
  does, and why);
- no import loop between fusion_ray's modules, counting imports inside functions;
- only `pipeline.py` imports modules by name at run time (`importlib.import_module`, `__import__`):
  a stage is never reached behind the checks' backs;
- no module imports another package's private (`_underscore`) names, nor reaches them as
  attributes of a module it imported.

Every import statement counts, at module level or inside a function alike.
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
TOP = {"fusion_ray", "fusion_ray.pipeline", "fusion_ray.cli", "fusion_ray.demo"}  # a module or a package
# shared module → the stage module it may import, and why
SHARED_EXCEPTIONS = {
    # the merge method registry is merge's declaration of its methods (pure Python, no torch);
    # config validates `merge.method` and its parameters against it (MergeConfig, in the config's
    # explicit-method sections), so a method is declared once
    ("fusion_ray.config.explicit", "fusion_ray.merge.registry"),
}


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


def unit_of(module: str) -> str:
    """`fusion_ray.<package or module>` of a fusion_ray module (its first two parts)."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> str:
    parts = module.split(".")
    if module in TOP or unit_of(module) in TOP:
        return "top"
    if len(parts) > 2 and parts[1] in STAGE_PACKAGE_NAMES:
        return "stage"
    return "shared"


def module_targets(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, fusion_ray module) of every import of `path` that names a module of `known`
    (`from a.b import c` names `a.b.c` when that is a module, else `a.b`)."""
    out = []
    for line, module, name, _ in imports(path):
        target = f"{module}.{name}" if name and f"{module}.{name}" in known else module
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target in known:
            out.append((line, target))
    return out


def fusion_modules(files: list[Path]) -> dict[str, Path]:
    return {module_name(p): p for p in files if module_name(p).split(".")[0] == "fusion_ray"}


def stage_import_violations(files: list[Path]) -> list[str]:
    """Modules of a stage package that import a module of another stage package."""
    mods = fusion_modules(files)
    known = set(mods) | {m for m in (f"fusion_ray.{p}" for p in STAGE_PACKAGE_NAMES)}
    bad = []
    for mod, path in mods.items():
        if layer(mod) != "stage":
            continue
        for line, target in module_targets(path, known):
            if layer(target) == "stage" and unit_of(target) != unit_of(mod) or \
                    target in {f"fusion_ray.{p}" for p in STAGE_PACKAGE_NAMES} - {unit_of(mod)}:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
    return bad


def shared_import_violations(files: list[Path]) -> list[str]:
    """Shared modules that import a stage package's module or the top."""
    mods = fusion_modules(files)
    known = set(mods) | {f"fusion_ray.{p}" for p in STAGE_PACKAGE_NAMES}
    bad = []
    for mod, path in mods.items():
        if layer(mod) != "shared":
            continue
        for line, target in module_targets(path, known):
            upward = layer(target) in ("stage", "top") or target in {f"fusion_ray.{p}" for p in STAGE_PACKAGE_NAMES}
            if upward and (mod, target) not in SHARED_EXCEPTIONS:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
    return bad


def import_loops(files: list[Path]) -> list[list[str]]:
    """The import loops between fusion_ray's modules (strongly connected groups of two or more)."""
    mods = fusion_modules(files)
    graph = {m: {t for _, t in module_targets(p, set(mods)) if t != m} for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def dynamic_import_violations(files: list[Path]) -> list[str]:
    """`importlib.import_module(...)` / `__import__(...)` outside `fusion_ray/pipeline.py`."""
    bad = []
    for path in files:
        if module_name(path).split(".")[0] != "fusion_ray" or module_name(path) == "fusion_ray.pipeline":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        for line, f in sorted(((c.lineno, c.func) for c in calls), key=lambda lf: lf[0]):
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                bad.append(f"{path.relative_to(REPO)}:{line}: {name}")
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


def test_stage_packages_do_not_import_each_other():
    assert stage_import_violations(python_files()) == []


def test_shared_modules_import_no_stage_and_not_the_top():
    assert shared_import_violations(python_files()) == []


def test_the_shared_exceptions_are_still_needed():
    """An exception that no import uses any more is dropped from the list, not kept as a hole."""
    mods = fusion_modules(python_files())
    used = {(m, t) for m, p in mods.items() for _, t in module_targets(p, set(mods))}
    assert SHARED_EXCEPTIONS <= used


def test_no_import_loops():
    assert import_loops(python_files()) == []


def test_only_the_pipeline_imports_by_name():
    assert dynamic_import_violations(python_files()) == []


def test_no_module_imports_another_packages_private_names():
    assert private_import_violations(python_files()) == []


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """Each AST check finds what it is for (files written into a scratch copy of the layout)."""
    import tests.test_layout as layout

    monkeypatch.setattr(layout, "REPO", tmp_path)
    for package in ("fuse", "align", "engines"):
        (tmp_path / "fusion_ray" / package).mkdir(parents=True)
        (tmp_path / "fusion_ray" / package / "__init__.py").write_text("")
    (tmp_path / "fusion_ray" / "__init__.py").write_text("")
    (tmp_path / "fusion_ray" / "align" / "stage.py").write_text("")
    (tmp_path / "fusion_ray" / "align" / "vocab.py").write_text("")
    (tmp_path / "fusion_ray" / "fuse" / "stage.py").write_text("")
    (tmp_path / "fusion_ray" / "pipeline.py").write_text("import importlib\nimportlib.import_module('x')\n")
    files = lambda: sorted((tmp_path / "fusion_ray").rglob("*.py"))  # noqa: E731

    bad_stage = tmp_path / "fusion_ray" / "fuse" / "x.py"
    bad_stage.write_text("from fusion_ray.align.stage import Aligner\nfrom fusion_ray.align import stage\n"
                         "from fusion_ray.fuse import stage as own\nimport fusion_ray.align.vocab\n"
                         "def later():\n    from fusion_ray.align import vocab\n")
    assert [v.split(": ", 1)[1] for v in layout.stage_import_violations(files())] == [
        "imports fusion_ray.align.stage", "imports fusion_ray.align.stage", "imports fusion_ray.align.vocab",
        "imports fusion_ray.align.vocab"]
    bad_stage.unlink()

    shared = tmp_path / "fusion_ray" / "engines" / "scoring.py"
    shared.write_text("def later():\n    from fusion_ray.fuse.stage import run\n    from fusion_ray import pipeline\n")
    assert [v.split(": ", 1)[1] for v in layout.shared_import_violations(files())] == [
        "imports fusion_ray.fuse.stage", "imports fusion_ray.pipeline"]
    shared.write_text("")

    a, b = tmp_path / "fusion_ray" / "a.py", tmp_path / "fusion_ray" / "b.py"
    a.write_text("from fusion_ray import b\n")
    b.write_text("def later():\n    import fusion_ray.a\n")  # a loop through a function-level import
    assert layout.import_loops(files()) == [["fusion_ray.a", "fusion_ray.b"]]
    b.write_text("")
    assert layout.import_loops(files()) == []

    sneaky = tmp_path / "fusion_ray" / "engines" / "load.py"
    sneaky.write_text("import importlib\nrun = importlib.import_module('fusion_ray.fuse.stage').run\n"
                      "other = __import__('fusion_ray.align.stage')\n")
    assert [v.split(": ", 1)[1] for v in layout.dynamic_import_violations(files())] == ["import_module", "__import__"]
    sneaky.unlink()

    bad_private = tmp_path / "fusion_ray" / "fuse" / "y.py"
    bad_private.write_text("from fusion_ray.engines.scoring import _hidden\n"
                           "from fusion_ray.engines import scoring as engines\n"
                           "from fusion_ray.fuse.strategies import _own\nengines._hidden()\n")
    assert [v.split(": ", 1)[1] for v in layout.private_import_violations([bad_private])] == [
        "imports fusion_ray.engines.scoring._hidden", "uses fusion_ray.engines.scoring._hidden"]
