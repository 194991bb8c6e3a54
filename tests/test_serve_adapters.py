"""LoRA adapters served on one base by the HF engine (peft): each request decodes with its own adapter.

The oracle of an adapter's reply is the greedy reply of peft's own `merge_and_unload` of that
adapter (a dense model dir) decoded by a plain engine without adapters; the base's reply is the
base dir's, decoded the same way.
"""

import asyncio
import json

import pytest
from helpers import two_adapters

from fusion_ray.serve.app import ServeArgs, checked_adapter
from fusion_ray.serve.engines import HFChatEngine, Sampling, lora_options

GREEDY = Sampling(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    return two_adapters(tiny_models, tmp_path_factory.mktemp("serve-adapters"))


def tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def reply(engine, prompt, adapter=None, sampling=GREEDY) -> str:
    parts = [d.text async for d in engine.generate(prompt, sampling, "r", adapter)]
    return "".join(parts)


def test_each_adapter_replies_as_its_dense_merge_and_unlike_the_base(adapters):
    base, (a1, d1), (a2, d2) = adapters
    tok = tokenizer(base)
    prompts = [tok("the compiler", add_special_tokens=False)["input_ids"],
               tok("a river under", add_special_tokens=False)["input_ids"]]
    served = HFChatEngine(str(base), tok, dtype="float32", adapters={"arm-one": str(a1), "arm-two": str(a2)})

    def oracle(path):
        plain = HFChatEngine(str(path), tok, dtype="float32")
        return [asyncio.run(reply(plain, p)) for p in prompts]

    want = {None: oracle(base), "arm-one": oracle(d1), "arm-two": oracle(d2)}
    assert want["arm-one"] != want[None] and want["arm-two"] != want[None] and want["arm-one"] != want["arm-two"]
    for adapter, expected in want.items():
        assert [asyncio.run(reply(served, p, adapter)) for p in prompts] == expected, adapter

    async def interleaved():  # requests for different adapters in flight together
        jobs = [(a, i) for _ in range(2) for a in ("arm-two", None, "arm-one") for i in range(len(prompts))]
        got = await asyncio.gather(*(reply(served, prompts[i], a) for a, i in jobs))
        return [(a, i, g) for (a, i), g in zip(jobs, got, strict=True)]

    for adapter, i, got in asyncio.run(interleaved()):
        assert got == want[adapter][i], (adapter, i)
    served.close()


def test_an_adapter_on_another_base_is_refused_naming_its_config(adapters, tiny_models, tmp_path):
    base, (a1, _), _ = adapters
    other = tiny_models("qwen2", "gpt2", vocab_size=512, layers=1)
    with pytest.raises(ValueError, match=rf"{a1 / 'adapter_config.json'}.*names base model {base}"):
        checked_adapter(str(a1), str(other), str(other))
    assert checked_adapter(str(a1), str(base), str(base)) == str(a1.resolve())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        checked_adapter(str(base), str(base), str(base))
    args = ServeArgs(model_dir=str(other), engine="hf", adapters={"arm": str(a1)})
    with pytest.raises(ValueError, match="adapter_config.json names base model"):
        args.resolved()
    assert ServeArgs(model_dir=str(base), engine="hf", adapters={"arm": str(a1)}).resolved().adapters == {
        "arm": str(a1.resolve())}


def test_an_adapter_may_not_take_the_base_name(adapters):
    base, (a1, _), _ = adapters
    with pytest.raises(ValueError, match="base's model"):
        ServeArgs(model_dir=str(base), model_id="m", adapters={"m": str(a1)})
    with pytest.raises(ValueError, match="base's model id"):  # the default id: the dir's name
        ServeArgs(model_dir=str(base), adapters={base.name: str(a1)}).resolved()


def test_vllm_lora_options_hold_every_adapter_at_its_rank(adapters, tmp_path):
    _, (a1, _), (a2, _) = adapters  # ranks 4 and 2: vLLM's smallest max_lora_rank over 4 is 8
    assert lora_options({}) == {}
    assert lora_options({"x": str(a1), "y": str(a2)}) == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ValueError, match="rank 1024"):
        lora_options({"big": str(tmp_path)})
