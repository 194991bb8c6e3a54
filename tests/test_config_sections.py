"""Config sections own their settings; the config crosses into Ray one way and checks files once;
a merge method is declared once (config, spec and engine agree); ConfigError has its own module."""

import ast
import dataclasses
import importlib
import json
import pkgutil
from pathlib import Path

import pytest
import yaml

from fusion_ray import config as config_module
from fusion_ray import errors
from fusion_ray.config import ConfigError, FusionConfig, MergeConfig, TrainConfig, load_config, parse_config
from fusion_ray.merge import registry
from fusion_ray.merge.spec import METHODS, parse_spec

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
PACKAGE = REPO / "fusion_ray"


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


# --- sections own their settings ------------------------------------------------------------

def test_shard_size_lives_under_data_and_the_old_key_names_the_new_one():
    assert load_config(TINY).data.shard_rows == 500
    data = _tiny()
    data["collect"]["shard_rows"] = 500
    with pytest.raises(ConfigError) as err:
        parse_config(data, "old.yaml")
    assert err.value.errors == ["collect.shard_rows: unknown key: moved to data.shard_rows (got 500)"]


def test_align_and_fuse_ask_for_their_own_cpus():
    from fusion_ray.resources import resource_asks

    cfg = load_config(TINY, ["collect.num_cpus_per_actor=3", "align.num_cpus=0.25", "align.workers=3",
                             "fuse.num_cpus=0.75"])
    asks = resource_asks(cfg)
    assert [(a.count, a.cpus, a.upto) for a in asks["align"]] == [(1, 0.25, 3)]
    assert [a.cpus for a in asks["fuse"]] == [0.75]
    assert {a.cpus for a in asks["collect"]} == {3}


def test_lambda_for_each_arm():
    t = TrainConfig(lambda_clm=0.7)
    assert t.lambda_for("fused") == 0.7 and t.lambda_for("clm_only") == 1.0


def test_top_k_is_checked_against_a_local_vocabulary_at_load(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 8}))
    data = _tiny()
    data["pivot"]["path"] = str(model)
    with pytest.raises(ConfigError, match=r"collect.top_k=10 exceeds the vocabulary of model 'pivot' \(8 tokens\)"):
        parse_config(data)
    with pytest.raises(ValueError, match="top_k=10 exceeds the vocabulary of model 'x' \\(9 tokens\\)"):
        load_config(TINY).collect.check_top_k("x", 9)  # what collect's preflight calls with each tokenizer


# --- one way across Ray, file checks once -----------------------------------------------------

def _local_config(tmp_path: Path) -> dict:
    model, corpus = tmp_path / "model", tmp_path / "chat.jsonl"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 64}))
    corpus.write_text("{}\n")
    data = _tiny()
    data["pivot"]["path"] = str(model)
    data["data"]["train"] = [{"path": str(corpus)}]
    return data


def test_the_wire_round_trips_the_whole_config_without_touching_files(tmp_path, monkeypatch):
    cfg = parse_config(_local_config(tmp_path))
    wire = cfg.to_wire()
    assert json.loads(json.dumps(wire)) == wire  # plain JSON: any Ray serialiser carries it
    for path in (tmp_path / "model" / "config.json", tmp_path / "model", tmp_path / "chat.jsonl"):
        path.unlink() if path.is_file() else path.rmdir()  # a worker's node need not have the driver's paths

    def touched(*args, **kwargs):
        raise AssertionError("validation on the worker touched the file system")

    modules = [config_module] + [importlib.import_module(f"{config_module.__name__}.{m.name}")
                                 for m in pkgutil.iter_modules(config_module.__path__)]
    for module in modules:  # every module of the config package that binds them
        for name in ("check_location", "local_vocab_size"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, touched)
    again = FusionConfig.from_wire(wire)
    assert again == cfg and again.config_hash() == cfg.config_hash()
    monkeypatch.undo()
    with pytest.raises(ConfigError) as err:  # loading the same dict does check them
        parse_config(wire)
    assert [e.split(":")[0] for e in err.value.errors] == ["pivot.path", "data.train.0.path"]


def test_the_wire_still_validates_values():
    wire = load_config(TINY).to_wire()
    wire["train"]["lambda_clm"] = 2
    with pytest.raises(ValueError, match="lambda_clm"):
        FusionConfig.from_wire(wire)


def test_stages_validate_config_pieces_only_through_the_wire():
    """No stage re-validates a section or the config itself: it arrives by `FusionConfig.from_wire`."""
    pieces = ("FusionConfig", "ModelSpec", "CorpusSpec", "DataConfig", "CollectConfig", "AlignConfig",
              "FuseConfig", "TrainConfig", "MergeConfig", "EvalConfig")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE / "config":  # the config package itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("model_validate", "model_validate_json") \
                    and isinstance(node.value, ast.Name) and node.value.id in pieces:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == []


# --- a merge method declared once -------------------------------------------------------------

# The methods, parameters and input contracts as they were declared in spec.py before the registry
# (mergekit 0.1.5's names and defaults, `varm` FuseChat's): the registry must keep them exactly.
_R = "required"
BEFORE = {
    "linear": ({"normalize": True}, {"weight": _R}, False, 1, None),
    **{name: ({"int8_mask": False, "normalize": norm, "rescale": rescale, "lambda": 1.0},
              {"weight": _R, "density": 1.0}, True, 2, None)
       for name, norm, rescale in (("task_arithmetic", False, False), ("ties", True, False),
                                   ("dare_ties", False, True), ("dare_linear", False, True))},
    "slerp": ({"t": _R}, {}, True, 2, 2),
    "model_stock": ({"filter_wise": False}, {}, True, 3, None),
    "sce": ({"int8_mask": False, "select_topk": 1.0}, {}, True, 2, None),
    "varm": ({}, {}, True, 2, None),
}


def _shown(params: dict) -> dict:
    return {k: _R if v is registry.REQUIRED else v for k, v in params.items()}


def test_the_registry_keeps_every_method_as_declared_before():
    assert list(registry.METHODS) == list(BEFORE)
    for name, m in registry.METHODS.items():
        assert (_shown(m.shared), _shown(m.per_input), m.needs_base, m.min_inputs, m.max_inputs) == BEFORE[name]


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_config_spec_and_engine_agree_on_each_method(name, monkeypatch):
    torch = pytest.importorskip("torch")
    from fusion_ray.merge import engine

    method = registry.METHODS[name]
    required = {k: 0.5 for k, v in {**method.shared, **method.per_input}.items() if v is registry.REQUIRED}
    assert MergeConfig(method=name, parameters=required).method == name  # the config accepts it
    n = max(method.min_inputs, 3 if method.max_inputs is None else method.max_inputs)
    models = [{"model": f"/m{i}"} for i in range(n - 1)]
    spec = parse_spec({"models": models, "base_model": "/base", "merge_method": name, "parameters": required})
    assert METHODS[name] is method and spec.method is method  # the spec's method is the registry's

    calls = []
    monkeypatch.setitem(registry.METHODS, name, dataclasses.replace(method, run=lambda x: calls.append(x) or "out"))
    xs = [torch.full((2, 2), float(i)) for i in range(n)]
    assert engine.apply_method(spec, xs, "model.layers.0.mlp.weight", 0.0, seed=7) == "out"  # the engine runs it
    (got,) = calls
    assert got.tensors is xs and got.base == spec.base_index() and got.seed == 7
    assert set(got.shared) == set(method.shared) and all(set(p) == set(method.per_input)
                                                         for p in got.per_input.values())


def test_registry_functions_compute_what_the_methods_do():
    """The registry's argument plumbing: each method against a direct call of its tensor function."""
    torch = pytest.importorskip("torch")
    from fusion_ray.merge import engine, methods

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g) for _ in range(4)]  # inputs 0..2, base last
    base, others = xs[3], xs[:3]
    name = "model.layers.1.self_attn.q_proj.weight"

    def run(method, parameters=None, per=None, **extra):
        models = [{"model": f"/m{i}", **({"parameters": per[i]} if per else {})} for i in range(3)]
        if method == "slerp":
            models = models[:1]
        spec = parse_spec({"models": models, "base_model": "/base", "merge_method": method,
                           "parameters": parameters or {}, **extra})
        inputs = xs[:len(models)] + [base]
        return engine.apply_method(spec, inputs, name, 0.5, seed=3)

    ws, ds = [{"weight": 0.2 * (i + 1), "density": 0.6} for i in range(3)], [0.6] * 3
    seeds = [methods.stable_seed(3, name, i) for i in range(3)]
    expect = {
        "ties": methods.task_arithmetic_family(base, others, [0.2, 0.4, 0.6], ds, sparsify="magnitude", consensus=True,
                                               normalize=True, rescale=False, lambda_=1.0, seeds=seeds),
        "dare_linear": methods.task_arithmetic_family(base, others, [0.2, 0.4, 0.6], ds, sparsify="random",
                                                      consensus=False, normalize=False, rescale=True, seeds=seeds),
    }
    assert torch.equal(run("ties", per=ws), expect["ties"])
    assert torch.equal(run("dare_linear", per=ws), expect["dare_linear"])
    assert torch.equal(run("slerp", {"t": 0.3}), methods.slerp(0.3, base, xs[0]))
    assert torch.equal(run("model_stock"), methods.model_stock(base, others))
    assert torch.equal(run("sce", {"select_topk": 0.5}, variant="fusechat", selection="sort"),
                       methods.sce(base, others, 0.5, "fusechat", True))
    assert torch.equal(run("varm"), methods.varm(base, others))
    linear = parse_spec({"models": [{"model": f"/m{i}", "parameters": {"weight": w}}
                                    for i, w in enumerate((1.0, 2.0, 3.0, 4.0))], "merge_method": "linear"})
    assert torch.equal(engine.apply_method(linear, xs, name, 0.0, seed=0), methods.linear(xs, [1.0, 2.0, 3.0, 4.0]))


def test_an_unknown_method_names_merge_method():
    data = _tiny()
    data["merge"] = {"method": "frankenmerge"}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    (line,) = err.value.errors
    assert line.startswith("merge.method: ") and "'sce'" in line and "frankenmerge" in line
    with pytest.raises(ConfigError, match="unknown merge method 'frankenmerge'; known: linear, task_arithmetic"):
        parse_spec({"models": [{"model": "/a"}], "merge_method": "frankenmerge"})
    data["merge"] = {"method": "slerp", "parameters": {"select_topk": 0.5}}
    with pytest.raises(ConfigError, match="merge: unknown parameter.s. select_topk for merge method slerp; known: t"):
        parse_config(data)


def test_a_method_is_declared_only_once():
    with pytest.raises(ValueError, match="merge method sce is declared twice"):
        registry.register("sce")(lambda x: x)
    assert registry.METHODS["sce"].run.__name__ == "_sce"


# --- ConfigError in its own module: no import cycles --------------------------------------------

def _imports(path: Path) -> set[str]:
    """fusion_ray modules a file imports anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fusion_ray"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fusion_ray")}
    return out


def test_config_errors_and_spec_import_no_cycle():
    assert config_module.ConfigError is errors.ConfigError
    assert _imports(PACKAGE / "errors.py") == set()
    assert not {m for path in (PACKAGE / "config").glob("*.py") for m in _imports(path)
                if m.startswith("fusion_ray.merge.spec")}
    assert not {m for m in _imports(PACKAGE / "merge" / "registry.py")
                if m.startswith(("fusion_ray.config", "fusion_ray.merge.spec"))}
    assert "fusion_ray.errors" in _imports(PACKAGE / "merge" / "spec.py")
    cli = _imports(PACKAGE / "cli.py")  # the CLI runs the demo; the demo needs nothing of the CLI
    assert "fusion_ray.demo.run" in cli and not any(m.startswith("fusion_ray.cli") for m in _imports(
        PACKAGE / "demo" / "run.py"))


@pytest.mark.parametrize("first", ["fusion_ray.merge.spec", "fusion_ray.config", "fusion_ray.merge.registry"])
def test_each_imports_alone_without_torch(first):
    from tests.test_imports import _loaded_after

    loaded = _loaded_after(f"import {first}\nimport fusion_ray.config, fusion_ray.merge.spec, fusion_ray.errors")
    assert not loaded["torch"], loaded
