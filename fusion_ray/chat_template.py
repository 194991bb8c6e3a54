"""Chat rows → one rendered text per conversation, with the char spans that are scored.

Pure: no Ray, no engines. Accepts ShareGPT rows (`conversations` of `from`/`value`)
and OpenAI rows (`messages` of `role`/`content`). Each conversation is rendered ONCE
with the pivot's chat template, so every model scores the same characters; the
spans of assistant turns (the scored part) are found by rendering growing prefixes.
Rows that cannot be used raise `RowRejected` with the reason; texts longer than
`max_length` pivot tokens are cut at a token boundary and flagged.

`encode_response` is the same rendering for a chat plus one response (what SFT and DPO train
on and the DPO reference pass scores): the response's tokens are the scored ones, by the same
rule as `loss_mask` (entry t says whether token t+1 is scored); earlier assistant turns are
context. A row longer than `max_length` tokens is cut there, and one whose response starts past
the cut has nothing to train on (None).
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import dataclass
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "system": "system"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class RowRejected(ValueError):
    """A corpus row that cannot be used; the message is the reason stored in `rejected/`."""


@dataclass
class Prepared:
    sample_id: str
    text: str
    span_starts: list[int]
    span_ends: list[int]
    truncated: bool


def sample_id_of(row: dict[str, Any]) -> str:
    """The row's own `id` (or `sample_id`), else a hash of its content."""
    for key in ("id", "sample_id"):
        if isinstance(row.get(key), str | int) and str(row[key]):
            return str(row[key])
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def to_messages(row: dict[str, Any], fmt: str = "auto") -> list[dict[str, str]]:
    """Normalise a ShareGPT or OpenAI row to `[{"role", "content"}]`.

    Raises:
        RowRejected: naming the message index and field that is wrong.
    """
    if not isinstance(row, dict):
        raise RowRejected(f"row is a {type(row).__name__}, not an object")
    if fmt == "auto":
        fmt = "openai" if "messages" in row else "sharegpt" if "conversations" in row else ""
    if fmt not in ("openai", "sharegpt"):
        raise RowRejected("no 'messages' or 'conversations' field")
    key, role_key, text_key, roles = (
        ("messages", "role", "content", OPENAI_ROLES) if fmt == "openai"
        else ("conversations", "from", "value", SHAREGPT_ROLES))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowRejected(f"'{key}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowRejected(f"{key}[{i}] is not an object")
        role, content = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str) or role not in roles:
            raise RowRejected(f"{key}[{i}].{role_key}: unknown role {reprlib.repr(role)}")
        if not isinstance(content, str):
            raise RowRejected(f"{key}[{i}].{text_key}: content is not a string")
        if not content.strip():
            raise RowRejected(f"{key}[{i}].{text_key}: empty content")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RowRejected(f"{key}[{i}].{text_key}: not valid Unicode (a lone surrogate at character "
                              f"{err.start})") from None
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no assistant turn")
    return messages


def template(tokenizer, messages: list[dict[str, str]], **kwargs) -> str:
    """The chat template's rendering of `messages`.

    Raises:
        RowRejected: where the template refuses the conversation (many raise on roles that
            do not alternate, or on a system turn they do not support).
    """
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise RowRejected(f"the chat template refuses it: {type(err).__name__}: {str(err)[:200]}") from None


def render(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int], list[int]]:
    """Render once with the chat template; return (text, span_starts, span_ends) of replies."""
    if messages[0]["role"] == "assistant":
        raise RowRejected("the conversation starts with an assistant turn: no prompt before it")
    text = template(tokenizer, messages)
    starts, ends = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template(tokenizer, messages[:i], add_generation_prompt=True)
        through = template(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise RowRejected("chat template does not render conversation prefixes as prefixes")
        starts.append(len(before))
        ends.append(len(through))
    return text, starts, ends


def truncate(text: str, starts: list[int], ends: list[int], char_limit: int | None):
    """Cut text and spans at `char_limit` (a token boundary); drop spans that vanish."""
    if char_limit is None or char_limit >= len(text):
        return text, starts, ends, False
    kept = [(s, min(e, char_limit)) for s, e in zip(starts, ends, strict=True) if s < char_limit]
    if not kept:
        raise RowRejected("no assistant text within max_length")
    return text[:char_limit], [s for s, _ in kept], [e for _, e in kept], True


def prepare_row(row: dict[str, Any], tokenizer, *, max_length: int, fmt: str = "auto") -> Prepared:
    """Validate, render and (if needed) truncate one corpus row.

    Args:
        tokenizer: the pivot's tokenizer (its chat template renders the text; its
            tokens measure `max_length`).

    Raises:
        RowRejected: with the reason.
    """
    messages = to_messages(row, fmt)
    text, starts, ends = render(tokenizer, messages)
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    limit = offsets[max_length - 1][1] if len(offsets) > max_length else None
    text, starts, ends, cut = truncate(text, starts, ends, limit)
    return Prepared(sample_id_of(row), text, starts, ends, cut)


def encode_response(tokenizer, messages: list[dict], response: str, max_length: int):
    """(input_ids [T] int32, loss_mask [T-1] bool), or None when no response token fits.

    Raises:
        RowRejected: the chat template refuses the chat.
    """
    import numpy as np

    from fusion_ray.engines.topk import loss_mask

    text, starts, ends = render(tokenizer, [*messages, {"role": "assistant", "content": response}])
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"][:max_length], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"][:max_length], dtype=np.int64).reshape(-1, 2)
    if len(ids) < 2:
        return None
    mask = loss_mask(offsets, starts[-1:], ends[-1:])
    return (ids, mask) if mask.any() else None
