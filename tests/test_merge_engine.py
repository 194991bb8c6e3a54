"""Merge specs, streaming I/O and whole merges on tiny models built here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fusion_ray.checkpoint.streaming import Checkpoint, ShardWriter
from fusion_ray.config import ConfigError
from fusion_ray.merge import engine
from fusion_ray.merge.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def finetune(src: Path, dst: Path, seed: int, scale: float = 0.05, shard: str | None = None) -> Path:
    """A copy of `src` whose float weights moved by a small random delta (optionally sharded)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    moved = {k: (v + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
             for k, v in weights.items()}
    if shard:
        from transformers import AutoModelForCausalLM

        (dst / "model.safetensors").unlink()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.load_state_dict(moved, strict=False)
        model.save_pretrained(dst, max_shard_size=shard)
    else:
        save_file(moved, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def trio(tiny_models, tmp_path_factory):
    """A base and two fine-tunes of one tiny Qwen2 (the second one sharded)."""
    root = tmp_path_factory.mktemp("trio")
    base = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    return base, finetune(base, root / "ft1", 1), finetune(base, root / "ft2", 2, shard="60KB")


def spec(base, models, method="sce", **extra):
    return parse_spec({"models": [{"model": str(m)} for m in models], "base_model": str(base),
                       "merge_method": method, **extra})


def weights(model_dir: Path) -> dict:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_gradients_and_filters_resolve_like_mergekit():
    s = parse_spec({"models": [{"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.0},
                                                                        {"value": [0.0, 1.0]}]}},
                               {"model": "b"}],
                    "base_model": "b", "merge_method": "ties", "parameters": {"density": 0.5, "weight": 0.7}})
    assert s.input_params(0, "model.layers.1.self_attn.q_proj.weight", 0.5)["weight"] == 0.0
    assert s.input_params(0, "model.layers.1.mlp.up_proj.weight", 0.25)["weight"] == 0.25
    assert s.shared_params("x", 0.0) == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}
    assert engine.layer_t("model.layers.3.mlp.up_proj.weight", 7) == 0.5
    assert engine.layer_t("model.embed_tokens.weight", 7) == 0.0
    assert engine.layer_t("model.layers.0.x", 1) == 1.0


@pytest.mark.parametrize("data, needle", [
    ({"merge_method": "frobnicate"}, "unknown merge method 'frobnicate'"),
    ({"merge_method": "ties", "parameters": {"densty": 0.5}}, "unknown parameter(s) densty"),
    ({"merge_method": "ties", "base_model": None}, "needs base_model"),
    ({"merge_method": "sce", "colour": "red"}, "colour: unknown key"),
    ({"merge_method": "slerp", "slices": [], "models": None}, "only one slice of whole models"),
])
def test_bad_specs_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=None) as err:
        parse_spec({"models": [{"model": "a"}, {"model": "b"}], "base_model": "b", **data})
    assert needle in str(err.value)


def test_shard_writer_plans_offsets_and_index(tmp_path):
    tensors = {f"t{i}": torch.arange(i * 10, dtype=torch.float32).reshape(i, 10) + i for i in range(1, 6)}
    writer = ShardWriter(str(tmp_path), [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], shard_bytes=400)
    for name in reversed(list(tensors)):  # any order: slots are fixed
        writer.write(name, tensors[name])
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = weights(tmp_path)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    ck = Checkpoint(str(tmp_path))
    assert torch.equal(ck.read("t3"), tensors["t3"])


def test_end_to_end_merge_loads_in_transformers_and_generates(trio, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft1, ft2 = trio
    s = spec(base, [ft1, ft2], "sce", parameters={"select_topk": 0.5}, variant="fusechat", dtype="float32",
             out_dtype="bfloat16")
    stats = engine.run_merge(s, str(tmp_path / "out"), threads=2)
    out = tmp_path / "out"
    assert stats["tensors"] == len(Checkpoint(str(base)).tensors)
    card = (out / "README.md").read_text()
    assert "sce" in card and "fusechat" in card and str(ft2) in card and "select_topk" in card
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert not list(tmp_path.glob(".out.partial-*"))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("method, params", [("linear", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 0.5}),
                                            ("sce", {"select_topk": 0.3}), ("varm", {})])
def test_merging_identical_models_returns_them(trio, tmp_path, method, params):
    base = trio[0]
    s = spec(base, [base, base] if method != "linear" else [base], method, parameters=params, dtype="float32")
    engine.run_merge(s, str(tmp_path / "out"))
    got, want = weights(tmp_path / "out"), weights(base)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)


def test_dare_result_does_not_depend_on_threads_or_order(trio, tmp_path):
    base, ft1, ft2 = trio
    s = spec(base, [ft1, ft2], "dare_ties", parameters={"weight": 0.5, "density": 0.5})
    engine.run_merge(s, str(tmp_path / "a"), seed=3, threads=1)
    engine.run_merge(s, str(tmp_path / "b"), seed=3, threads=2)
    engine.run_merge(s, str(tmp_path / "c"), seed=4, threads=1)
    a, b, c = (weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_over_layers_reaches_each_layer(trio, tmp_path):
    base, ft1, _ = trio
    s = parse_spec({"models": [{"model": str(base)}, {"model": str(ft1)}], "base_model": str(base),
                    "merge_method": "slerp", "parameters": {"t": [0.0, 1.0]}, "dtype": "float32"})
    engine.run_merge(s, str(tmp_path / "out"))
    got, b, f = weights(tmp_path / "out"), weights(base), weights(ft1)
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.allclose(got[name.format(0)], b[name.format(0)], atol=1e-6)  # t = 0 at the first layer
    assert torch.allclose(got[name.format(1)], f[name.format(1)], atol=1e-6)  # t = 1 at the last


def test_bad_inputs_fail_clearly(tiny_models, trio, tmp_path):
    base, ft1, _ = trio
    other_arch = tiny_models("mistral", "gpt2", vocab_size=512, layers=2)
    other_vocab = tiny_models("qwen2", "gpt2", vocab_size=600, layers=2)
    fewer_layers = tiny_models("qwen2", "gpt2", vocab_size=512, layers=1)
    cases = [(other_arch, "different architectures"), (other_vocab, "vocab size mismatch"),
             (fewer_layers, "tensor sets differ")]
    for model, needle in cases:
        with pytest.raises(ValueError, match=needle):
            engine.run_merge(spec(base, [ft1, model]), str(tmp_path / "x"))
    wide = finetune(base, tmp_path / "wide", 5)
    w = load_file(str(wide / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(400, 128)
    save_file(w, str(wide / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*\(384, 128\).*\(400, 128\)"):
        engine.run_merge(spec(base, [ft1, wide]), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_vocab_common_merges_the_shared_rows_and_keeps_the_pivots(trio, tiny_models, tmp_path):
    base = trio[0]
    bigger = finetune(tiny_models("qwen2", "gpt2", vocab_size=600, layers=2), tmp_path / "big", 7)
    s = spec(base, [base, bigger], "linear", parameters={"weight": 1.0}, vocab="common", dtype="float32")
    engine.run_merge(s, str(tmp_path / "out"))
    got, b, g = weights(tmp_path / "out"), weights(base), weights(bigger)
    emb = "model.embed_tokens.weight"
    rows = b[emb].shape[0]
    assert got[emb].shape == b[emb].shape
    assert torch.allclose(got[emb], (b[emb] + g[emb][:rows]) / 2, atol=1e-6)


def test_pickle_weights_need_opt_in(trio, tmp_path):
    base, ft1, _ = trio
    pickled = tmp_path / "pickled"
    shutil.copytree(ft1, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle"):
        engine.run_merge(spec(base, [ft1, pickled]), str(tmp_path / "x"))
    engine.run_merge(spec(base, [ft1, pickled], allow_pickle=True), str(tmp_path / "ok"))
    assert (tmp_path / "ok" / "model.safetensors").exists()


def test_cli_merges_a_mergekit_yaml_and_refuses_to_overwrite(trio, tmp_path):
    base, ft1, ft2 = trio
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.5}}],
        "base_model": str(base), "merge_method": "dare_ties", "dtype": "float32",
        "tokenizer_source": "base"}))
    assert load_spec(cfg).merge_method == "dare_ties"
    cmd = [sys.executable, "-m", "fusion_ray.cli", "merge", str(cfg), str(tmp_path / "out"), "--seed", "1"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    assert "merged" in first.stdout and (tmp_path / "out" / "config.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 2 and "exists" in again.stderr


def test_merge_package_and_spec_load_no_engine():
    from tests.test_imports import _loaded_after

    loaded = _loaded_after("import fusion_ray.merge, fusion_ray.merge.spec, fusion_ray.merge.actor")
    assert not any(loaded.values()), loaded


def test_fusechat_slerp_config_with_one_whole_slice(trio, tmp_path):
    base, ft1, _ = trio
    cfg = tmp_path / "slerp.yaml"
    cfg.write_text(yaml.safe_dump({
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]},
                                {"model": str(ft1), "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": str(base), "dtype": "float32",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}))
    spec = load_spec(cfg)
    assert [m.model for m in spec.models] == [str(base), str(ft1)]
    assert spec.shared_params("model.layers.1.mlp.up_proj.weight", 1.0)["t"] == 0.0
    engine.run_merge(spec, str(tmp_path / "out"))
    got, b = weights(tmp_path / "out"), weights(base)
    name = "model.layers.1.mlp.up_proj.weight"  # last layer: mlp t = 0 → the base
    assert torch.allclose(got[name], b[name], atol=1e-6)
    partial = spec.model_copy(update={"models": [m.model_copy(update={"layer_range": (0, 1)}) for m in spec.models]})
    with pytest.raises(ValueError, match="does not cover"):
        engine.run_merge(partial, str(tmp_path / "x"))


def test_cli_sce_merge_of_real_scale_updates_weights_them_by_size(trio, tmp_path):
    """Targets that moved by RMS 1e-4 and 4e-4 (a real fine-tune's size): `fusion-ray merge` with
    SCE (fusechat) gives every tensor η ≈ (1/17, 16/17), as the float64 rule does, not (½, ½)."""
    from test_merge_methods import sce_reference

    base = trio[0]
    small = finetune(base, tmp_path / "small", 11, scale=1e-4)
    large = finetune(base, tmp_path / "large", 12, scale=4e-4)
    cfg = tmp_path / "sce.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"model": str(small)}, {"model": str(large)}], "base_model": str(base),
                                   "merge_method": "sce", "variant": "fusechat", "dtype": "float32"}))
    cmd = [sys.executable, "-m", "fusion_ray.cli", "merge", str(cfg), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    out, b, s, lg = (weights(d) for d in (tmp_path / "out", base, small, large))
    checked = 0
    for name, theta in b.items():
        if not theta.is_floating_point() or theta.numel() < 256:
            continue
        want, eta = sce_reference(theta, [s[name], lg[name]], 1.0)
        assert eta[1] / eta[0] > 10, (name, eta)
        assert torch.allclose(out[name].double() - theta.double(), want - theta.double(), rtol=1e-4, atol=1e-8), name
        checked += 1
    assert checked >= 5
