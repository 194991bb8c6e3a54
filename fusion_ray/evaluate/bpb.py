"""Bits per UTF-8 byte of a causal LM on chat text: fair across tokenizers.

A conversation's scored part is its assistant reply (the char span from the end of
the generation prompt to the end of the text). A token is scored when it starts
inside the span; `n_bytes` counts the UTF-8 bytes the scored tokens cover (to the
span's end, or to the truncation point). bpb = Σ NLL / n_bytes / ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def assistant_span(tokenizer, messages: list[dict]) -> tuple[str, int]:
    """Render `messages` with the chat template; return (text, char start of the last reply)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not text.startswith(prompt):
        raise ValueError("chat template: the generation prompt is not a prefix of the conversation")
    return text, len(prompt)


@torch.no_grad()
def score_spans(
    model, tokenizer, texts: Sequence[str], starts: Sequence[int], *, batch_size: int = 8,
    max_length: int = 1024,
) -> tuple[float, int]:
    """Sum of NLL (nats) over scored tokens and the UTF-8 bytes they cover.

    Args:
        texts: rendered conversations.
        starts: char offset where each text's scored span begins.

    Returns:
        (nll_sum, n_bytes) over all texts.
    """
    model.eval()
    nll_sum, n_bytes = 0.0, 0
    for lo in range(0, len(texts), batch_size):
        batch, batch_starts = list(texts[lo : lo + batch_size]), starts[lo : lo + batch_size]
        enc = tokenizer(batch, return_offsets_mapping=True, padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt", add_special_tokens=False)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        gold = logp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]  # [B, T-1]
        tok_start, tok_end = enc["offset_mapping"][:, 1:, 0], enc["offset_mapping"][:, 1:, 1]
        valid = enc["attention_mask"][:, 1:].bool()
        for b, (text, start) in enumerate(zip(batch, batch_starts, strict=True)):
            mask = valid[b] & (tok_start[b] >= start)
            if not mask.any():
                continue
            first, last = int(tok_start[b][mask].min()), int(tok_end[b][mask].max())
            nll_sum -= float(gold[b][mask].sum())
            n_bytes += len(text[first:last].encode())
    return nll_sum, n_bytes


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    return nll_sum / max(n_bytes, 1) / math.log(2)
