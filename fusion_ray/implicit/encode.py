"""A chat and a response → the target's tokens and the mask of the response's tokens (what SFT and
DPO train on and the reference pass scores).

The chat plus the response (as the assistant's last turn) is rendered once with the target's chat
template (`collect.prompts.render`, which also checks that the template renders prefixes as
prefixes), tokenized with offsets, and the mask marks the tokens that start inside the response's
span (the same rule as the explicit pipeline's `loss_mask`: entry t says whether token t+1 is
scored). Earlier assistant turns of a multi-turn prompt are context, not trained on. A row longer
than `max_length` tokens is cut there; one whose response starts past the cut has nothing to
train on and is dropped (None).
"""

from __future__ import annotations

import numpy as np


def encode_response(tokenizer, messages: list[dict], response: str, max_length: int):
    """(input_ids [T] int32, loss_mask [T-1] bool), or None when no response token fits.

    Raises:
        collect.prompts.RowRejected: the chat template refuses the chat.
    """
    from fusion_ray.collect.prompts import render
    from fusion_ray.collect.topk import loss_mask

    text, starts, ends = render(tokenizer, [*messages, {"role": "assistant", "content": response}])
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"][:max_length], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"][:max_length], dtype=np.int64).reshape(-1, 2)
    if len(ids) < 2:
        return None
    mask = loss_mask(offsets, starts[-1:], ends[-1:])
    return (ids, mask) if mask.any() else None
