"""LoRA targets (`train.peft`): settings, wrapping, what trains, saving, resuming, dense weights, QLoRA's guard."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fusion_ray.checkpoint.adapter import dense_start, write_dense
from fusion_ray.config import PeftSettings, TrainConfig
from fusion_ray.trainer import lora
from fusion_ray.trainer.strategies import Local, lr_lambda


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def settings(**kw):
    return PeftSettings(**{"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], **kw})


def randomise_adapters(model, seed=0):
    """Fresh LoRA B is zero (no update): give every adapter factor a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# --- settings -------------------------------------------------------------------------------------

def test_settings_default_to_full_fine_tuning_and_validate_each_field():
    assert TrainConfig().peft is None
    t = TrainConfig(peft={"rank": 8, "target_modules": ["q_proj"]})
    assert (t.peft.rank, t.peft.alpha, t.peft.dropout, t.peft.save_merged) == (8, 32, 0.0, False)
    assert TrainConfig(peft={}).peft.target_modules == "all-linear"
    for bad, field in [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"alpha": -1}, "alpha"),
                       ({"target_modules": []}, "target_modules"), ({"target_modules": ["q", "q"]}, "target_modules"),
                       ({"target_modules": ["a b"]}, "target_modules"), ({"ranks": 4}, "ranks"),
                       ({"quantize": "8bit"}, "quantize")]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(peft=bad)


def test_qlora_needs_ddp_on_gpus_in_the_config():
    with pytest.raises(ValueError, match="quantize: 4bit .* needs strategy ddp and use_gpu: true"):
        TrainConfig(peft={"quantize": "4bit"})
    assert TrainConfig(strategy="ddp", use_gpu=True, peft={"quantize": "4bit"}).peft.quantize == "4bit"


def test_qlora_on_this_machine_names_what_is_missing():
    import importlib.util

    want = []
    if importlib.util.find_spec("bitsandbytes") is None:
        want.append("bitsandbytes")
    if not torch.cuda.is_available():
        want.append("CUDA GPU")
    if not want:
        pytest.skip("bitsandbytes and a GPU are both here")
    with pytest.raises(ValueError, match="quantize: 4bit") as err:
        lora.quantized_load_kwargs(settings(quantize="4bit"), use_gpu=True)
    assert all(w in str(err.value) for w in want)
    assert lora.quantized_load_kwargs(settings(), use_gpu=False) == {}


# --- wrapping -------------------------------------------------------------------------------------

def test_unknown_target_modules_fail_naming_them_and_the_models_layers(tiny_models):
    model = load(tiny_models("qwen2", "gpt2"))
    with pytest.raises(ValueError, match=r"qq_proj, fc9 not found .* named: .*down_proj.*q_proj"):
        lora.apply_lora(model, settings(target_modules=["q_proj", "qq_proj", "fc9"]), base_ref="x")
    with pytest.raises(ValueError, match="self_attn name.* not linear"):
        lora.apply_lora(model, settings(target_modules=["self_attn"]), base_ref="x")


def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out(tiny_models, tmp_path):
    base = tiny_models("qwen2", "gpt2", layers=2)
    model = load(base)
    targets = ("q_proj", "v_proj", "up_proj")
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
    total_before = sum(p.numel() for p in model.parameters())
    wrapped = lora.apply_lora(model, settings(), base_ref=str(base), revision="r1")
    trainable, total = lora.trainable_fraction(wrapped)
    assert len(shapes) == 6
    assert trainable == sum(4 * (out + inp) for out, inp in shapes.values())
    assert total == total_before + trainable
    assert all(("lora_" in n) == p.requires_grad for n, p in wrapped.named_parameters())
    config = wrapped.peft_config["default"]
    assert config.base_model_name_or_path == str(base.resolve()) and config.revision == "r1"


# --- saving, resuming, dense weights --------------------------------------------------------------

def clm_step(strategy, ids):
    loss = strategy.model(input_ids=ids, labels=ids).loss
    strategy.backward(loss)
    strategy.step()


def test_resume_from_an_adapter_checkpoint_continues_the_same_run(tiny_models, tmp_path):
    """Two steps, save, a fresh process-like model loads the checkpoint: its adapters, optimizer and
    schedule equal the saved run's, and one more step gives the same weights in both."""
    base = tiny_models("qwen2", "gpt2", layers=2)
    t = SimpleNamespace(lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(1)
        return Local(lora.apply_lora(load(base), settings(), base_ref=str(base)), t, lr_lambda(10, 0.1))

    run = fresh()
    clm_step(run, ids)
    clm_step(run, ids)
    assert run.save(str(tmp_path), 2)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "train_state.pt", "fusion_ray.json"} <= set(saved)
    assert "model.safetensors" not in saved and "config.json" not in saved, "the base is not copied"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    other = fresh()
    assert other.load(str(tmp_path)) == 2
    mine, theirs = dict(run.model.named_parameters()), dict(other.model.named_parameters())
    for name, p in mine.items():
        torch.testing.assert_close(theirs[name], p, rtol=0, atol=0, msg=name)
    assert other.lr() == run.lr()
    clm_step(run, ids)
    clm_step(other, ids)
    for name, p in mine.items():
        torch.testing.assert_close(theirs[name], p, rtol=0, atol=0, msg=name)


def test_a_checkpoint_without_the_adapter_is_refused(tiny_models, tmp_path):
    base = tiny_models("qwen2", "gpt2")
    t = SimpleNamespace(lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    run = Local(lora.apply_lora(load(base), settings(), base_ref=str(base)), t, lr_lambda(10, 0.1))
    run.save(str(tmp_path), 1)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors"):
        run.load(str(tmp_path))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # Linear layers; GPT-2's Conv1D stores W transposed
def test_dense_weights_equal_peft_merge_and_unload(tiny_models, tmp_path, arch):
    base = tiny_models(arch, "gpt2", layers=2)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "qwen2" else ["c_attn", "c_fc"]
    model = lora.apply_lora(load(base), settings(target_modules=targets, alpha=6), base_ref=str(base))
    randomise_adapters(model)
    lora.save_adapter(model, str(tmp_path / "adapter"))
    stats = write_dense(str(tmp_path / "adapter"), str(tmp_path / "dense"))
    assert stats["adapted"] == 2 * len(targets)
    oracle = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    got = load(tmp_path / "dense").state_dict()
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == arch
    assert got.keys() == oracle.keys()
    moved = 0
    for name, want in oracle.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(want, load_file(str(base / "model.safetensors")).get(name, want))
    assert moved == 2 * len(targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_4bit_base_with_float_adapters_on_gpu(tiny_models):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from transformers import AutoModelForCausalLM

    base = tiny_models("qwen2", "gpt2", vocab_size=512, layers=2)
    s = settings(quantize="4bit")
    model = AutoModelForCausalLM.from_pretrained(base, **lora.quantized_load_kwargs(s, use_gpu=True))
    wrapped = lora.apply_lora(model, s, base_ref=str(base))
    t = SimpleNamespace(lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    run = Local(wrapped, t, lr_lambda(10, 0.1))
    ids = torch.randint(0, 500, (2, 12), device="cuda")
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    clm_step(run, ids)
    assert before and all("lora_" in n for n in before)
    assert any(not torch.equal(p, dict(wrapped.named_parameters())[n]) for n, p in before.items())


def test_later_stages_start_from_a_lora_targets_dense_weights(tmp_path):
    plain, adapter = tmp_path / "plain", tmp_path / "adapter"
    plain.mkdir()
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert dense_start(str(plain)) == str(plain)
    with pytest.raises(ValueError, match="LoRA adapter without dense weights.*save_merged: true"):
        dense_start(str(adapter))
    (adapter / "merged").mkdir()
    (adapter / "merged" / "config.json").write_text("{}")
    assert dense_start(str(adapter)) == f"{adapter}/merged"
