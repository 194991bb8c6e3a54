"""Merging LoRA adapter targets: the task vector is the adapter's dense delta, streamed tensor by tensor;
the oracle is peft's own merge_and_unload of each adapter, merged as an ordinary dense target."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import two_adapters
from safetensors.torch import load_file, save_file

from fusion_ray.checkpoint.adapter import AdapterCheckpoint
from fusion_ray.checkpoint.streaming import Checkpoint, CheckpointError
from fusion_ray.merge import engine
from fusion_ray.merge.spec import parse_spec


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    return two_adapters(tiny_models, tmp_path_factory.mktemp("adapters"))


def weights(model_dir: Path) -> dict:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def spec(base, models, method, **extra):
    weighted = method != "sce"  # sce sets its own weights
    data = {"models": [{"model": str(m), **({"parameters": {"weight": w}} if weighted else {})} for m, w in models],
            "merge_method": method, **extra}
    if method != "linear":  # linear: a plain weighted average of the targets themselves
        data["base_model"] = str(base)
    return parse_spec(data)


@pytest.mark.parametrize("method, extra", [
    ("ties", {"parameters": {"density": 0.5}}),
    ("sce", {"parameters": {"select_topk": 0.5}}),
    ("task_arithmetic", {}),
    ("dare_ties", {"parameters": {"density": 0.7}}),
    ("linear", {}),
])
def test_merging_adapters_equals_merging_their_dense_merged_targets(adapters, tmp_path, method, extra):
    base, (a1, d1), (a2, d2) = adapters
    got = engine.run_merge(spec(base, [(a1, 0.6), (a2, 0.4)], method, **extra), str(tmp_path / "a"), seed=3)
    want = engine.run_merge(spec(base, [(d1, 0.6), (d2, 0.4)], method, **extra), str(tmp_path / "d"), seed=3)
    g, w = weights(Path(got["dir"])), weights(Path(want["dir"]))
    assert g.keys() == w.keys() and got["tensors"] == want["tensors"]
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=0, atol=1e-6, msg=name)
    b = weights(base)
    assert any(not torch.equal(w[n], b[n]) for n in w), "the merge moved something"
    assert json.loads((Path(got["dir"]) / "config.json").read_text())["model_type"] == "qwen2"


def test_an_adapter_is_read_one_tensor_at_a_time(adapters, monkeypatch):
    """Reading one tensor of an adapter target reads that base tensor alone (no whole-model load)."""
    base, (a1, d1), _ = adapters
    ck = AdapterCheckpoint(str(a1))
    seen = []
    real = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: seen.append(name) or real(self, name))
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(ck.read(name), load_file(str(d1 / "model.safetensors"))[name], rtol=0, atol=1e-6)
    assert seen == [name]
    untouched = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(ck.read(untouched), load_file(str(base / "model.safetensors"))[untouched]), "zero elsewhere"


# --- hostile adapter inputs ------------------------------------------------------------------------

def broken(adapters, tmp_path) -> tuple[Path, Path]:
    base, (a1, _), _ = adapters
    copy = tmp_path / "adapter"
    shutil.copytree(a1, copy)
    return base, copy


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def merge_fails(base, adapter, tmp_path, match):
    with pytest.raises(CheckpointError, match=match):
        engine.run_merge(spec(base, [(adapter, 1.0)], "ties"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_adapter_weights_are_named(adapters, tmp_path):
    base, adapter = broken(adapters, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    merge_fails(base, adapter, tmp_path, r"adapter_model\.safetensors: missing")


def test_a_rank_other_than_the_configs_is_named(adapters, tmp_path):
    base, adapter = broken(adapters, tmp_path)
    edit_config(adapter, r=8)
    merge_fails(base, adapter, tmp_path, r"adapter_model\.safetensors: .* not of rank 8.*rank mismatch")


def test_a_lone_factor_is_named(adapters, tmp_path):
    base, adapter = broken(adapters, tmp_path)
    file = adapter / "adapter_model.safetensors"
    factors = load_file(str(file))
    lone = next(k for k in factors if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    del factors[lone]
    save_file(factors, str(file))
    merge_fails(base, adapter, tmp_path, r"layers\.0\.self_attn\.q_proj\.weight has no lora_B factor")


def test_an_adapter_naming_another_base_is_refused(adapters, tiny_models, tmp_path):
    base, adapter = broken(adapters, tmp_path)
    other = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2, seed=7)
    edit_config(adapter, base_model_name_or_path=str(other))
    merge_fails(base, adapter, tmp_path, rf"adapter_config\.json: the adapter was trained on {other}.*base_model is")


def test_an_adapter_whose_shapes_do_not_fit_its_base_is_refused(adapters, tiny_models, tmp_path):
    _, adapter = broken(adapters, tmp_path)
    wider = tiny_models("gpt2", "gpt2", vocab_size=512, layers=2)  # another architecture: other modules
    edit_config(adapter, base_model_name_or_path=str(wider))
    with pytest.raises(CheckpointError, match=r"safetensors: adapts .*, which the base model .* does not have"):
        AdapterCheckpoint(str(adapter))
    base, adapter = broken(adapters, tmp_path / "narrow")
    file = adapter / "adapter_model.safetensors"
    factors = load_file(str(file))
    key = next(k for k in factors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    factors[key] = torch.zeros(factors[key].shape[0], factors[key].shape[1] + 3)
    save_file(factors, str(file))
    merge_fails(base, adapter, tmp_path, r"q_proj\.weight: factors give a \[\d+, \d+\] update, but the base model "
                r".* holds it as")


def test_a_base_that_is_not_there_and_unsupported_lora_kinds_are_named(adapters, tmp_path):
    base, adapter = broken(adapters, tmp_path)
    edit_config(adapter, base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: names base model .*gone.*not a model dir"):
        AdapterCheckpoint(str(adapter))
    edit_config(adapter, base_model_name_or_path=str(base), use_dora=True)
    merge_fails(base, adapter, tmp_path, r"adapter_config\.json: use_dora true is not supported")
    edit_config(adapter, use_dora=False, peft_type="IA3")
    merge_fails(base, adapter, tmp_path, r"adapter_config\.json: peft_type 'IA3' is not LORA")
