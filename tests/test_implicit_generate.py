"""The `sample` stage's engines: n responses per prompt, seeded per prompt id (hf engine here;
vLLM's is exercised where the stage runs on it)."""

import pytest

from fusion_ray.engines.sampling import HFSampler, SampleSettings, prompt_seed


@pytest.fixture(scope="module")
def sampler(tiny_models):
    from transformers import AutoTokenizer

    path = tiny_models("qwen2", "gpt2")
    tok = AutoTokenizer.from_pretrained(path)
    return HFSampler(str(path), tok, dtype="float32", device="cpu"), tok


def prompts_of(tok, texts):
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"] for t in texts]


def test_n_samples_per_prompt_with_counts_and_reasons(sampler):
    engine, tok = sampler
    settings = SampleSettings(n=3, temperature=1.0, top_p=1.0, max_tokens=6, seed=1)
    out = engine.sample(prompts_of(tok, ["add 2 and 3", "spell cat"]), ["p0", "p1"], settings)
    assert [len(r) for r in out] == [3, 3]
    for s in (s for r in out for s in r):
        assert 0 < s.tokens <= 6 and s.finish_reason in ("stop", "length")
        assert s.finish_reason == "stop" or s.tokens == 6
    # an untrained model at T=1 over 512 tokens: three draws of six tokens do not all agree
    assert len({s.text for s in out[0]}) > 1


def test_a_prompts_samples_depend_on_its_id_and_seed_not_on_its_batch(sampler):
    engine, tok = sampler
    settings = SampleSettings(n=2, temperature=1.0, top_p=0.9, max_tokens=5, seed=7)
    a, b = prompts_of(tok, ["first question", "second question"])
    together = engine.sample([a, b], ["a", "b"], settings)
    alone = engine.sample([b], ["b"], settings)
    assert together[1] == alone[0]
    other_seed = engine.sample([b], ["b"], SampleSettings(n=2, temperature=1.0, top_p=0.9, max_tokens=5, seed=8))
    assert other_seed[0] != alone[0]
    assert prompt_seed(7, "b") != prompt_seed(7, "c") and prompt_seed(7, "b") == prompt_seed(7, "b")


def test_greedy_draws_are_identical(sampler):
    engine, tok = sampler
    out = engine.sample(prompts_of(tok, ["hello"]), ["g"], SampleSettings(n=3, temperature=0.0, max_tokens=4))
    assert len({(s.text, s.tokens) for s in out[0]}) == 1


@pytest.mark.parametrize("bad", [{"n": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
                                 {"repetition_penalty": 0}, {"max_tokens": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SampleSettings(**bad)
