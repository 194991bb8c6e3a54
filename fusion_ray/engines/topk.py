"""Per-token top-k next-token log-probs → rows of the `logits/` contract.

Pure numpy/torch: no Ray, no engines. The distribution at position t predicts
token t+1; log-probs are normalised over the FULL vocabulary. Both engines end
here: `from_logits` (a transformers forward) and `from_vllm` (vLLM's
`prompt_logprobs`, whose first entry is None and whose later entries hold the
top k plus, when outside them, the actual token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def from_logits(logits: torch.Tensor, ids: Sequence[int], k: int):
    """Top-k and gold log-probs from one sequence's logits.

    Args:
        logits: [T, V] logits of the sequence (no padding).
        ids: the T token ids.
        k: how many candidates to keep.

    Returns:
        (topk_ids [T-1, k] int32, topk_logprobs [T-1, k] float32, gold [T-1] float32).
    """
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    values, indices = logp.topk(k, dim=-1)
    gold = logp.gather(-1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]
    return indices.int().numpy(), values.numpy(), gold.numpy()


def from_vllm(prompt_logprobs: Sequence[dict[int, Any] | None], ids: Sequence[int], k: int):
    """Top-k and gold log-probs from vLLM's `prompt_logprobs` for one prompt.

    Each entry after the first maps token id → an object with `.logprob` and `.rank`
    (1 = most likely); the prompt's own token is present even when outside the top k.
    """
    n = len(ids) - 1
    topk_ids = np.zeros((n, k), dtype=np.int32)
    topk_lp = np.zeros((n, k), dtype=np.float32)
    gold = np.zeros(n, dtype=np.float32)
    for t in range(n):
        entry = prompt_logprobs[t + 1]
        ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= k)
        if len(ranked) != k:
            raise ValueError(f"vLLM returned {len(ranked)} of top-{k} log-probs at position {t + 1}")
        topk_ids[t] = [tid for _, tid, _ in ranked]
        topk_lp[t] = [lp for _, _, lp in ranked]
        gold[t] = entry[ids[t + 1]].logprob
    return topk_ids, topk_lp, gold


def loss_mask(offsets: np.ndarray, starts: Sequence[int], ends: Sequence[int]) -> np.ndarray:
    """[T-1] bool: token t+1 starts inside an assistant span [start, end)."""
    tok_start = offsets[1:, 0]
    mask = np.zeros(len(tok_start), dtype=bool)
    for s, e in zip(starts, ends, strict=True):
        mask |= (tok_start >= s) & (tok_start < e)
    return mask


def utf8_prefix(text: str) -> np.ndarray:
    """[len(text) + 1] UTF-8 byte offset of each char boundary."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def scored_bytes(text: str, offsets: np.ndarray, mask: np.ndarray) -> int:
    """UTF-8 bytes covered by the scored tokens (union of their char ranges).

    Byte-fallback tokens share their char's range; the union counts it once.
    """
    spans = offsets[1:][mask]
    if not len(spans):
        return 0
    prefix = utf8_prefix(text)
    ends = np.maximum.accumulate(spans[:, 1])
    starts = np.maximum(spans[:, 0], np.concatenate([[0], ends[:-1]]))
    width = prefix[spans[:, 1]] - prefix[np.minimum(starts, spans[:, 1])]
    return int(width.sum())


def logits_row(
    sample_id: str, text: str, ids: Sequence[int], offsets: np.ndarray, starts: Sequence[int],
    ends: Sequence[int], scored: tuple, *, scored_only: bool, requests: tuple | None = None,
) -> dict[str, Any]:
    """One row of the `logits/` schema.

    Args:
        offsets: [T, 2] char (start, end) of each token.
        scored: (topk_ids, topk_logprobs, gold) for positions 0..T-2.
        scored_only: keep top-k and gold only at scored positions (in order of the
            True entries of `loss_mask`).
        requests: (positions [n], prefixes [n]) of the exact conditioned entries in
            `scored[3]` (`schema.CONDITIONED` columns; positions become stored rows).
    """
    topk_ids, topk_lp, gold = scored[:3]
    mask = loss_mask(offsets, starts, ends)
    keep = mask if scored_only else slice(None)
    extra = {}
    if requests is not None:
        positions, prefixes = requests
        mass, c_ids, c_lps = scored[3]
        stored = np.cumsum(mask) - 1 if scored_only else np.arange(len(mask))
        ok = mask[positions] if scored_only else np.ones(len(positions), bool)
        pos = np.asarray(positions, dtype=np.int64)[ok]
        extra = {"cond_rows": stored[pos].astype(np.int32),
                 "cond_prefix": np.array([len(u) for u, o in zip(prefixes, ok, strict=True) if o], dtype=np.int32),
                 "cond_mass": np.asarray(mass, np.float32)[ok],
                 "cond_ids": np.asarray(c_ids, np.int32)[ok].reshape(-1, c_ids.shape[1]),
                 "cond_logprobs": np.asarray(c_lps, np.float32)[ok].reshape(-1, c_lps.shape[1])}
    return {
        "sample_id": sample_id,
        "input_ids": np.asarray(ids, dtype=np.int32),
        "offsets": offsets[:, 1].astype(np.int32),
        "loss_mask": mask,
        "topk_ids": topk_ids[keep],
        "topk_logprobs": topk_lp[keep].astype(np.float16),
        "gold_logprob": gold[keep].astype(np.float32),
        "nll_sum": float(-gold[mask].astype(np.float64).sum()),
        "n_bytes": scored_bytes(text, offsets, mask),
        **extra,
    }
