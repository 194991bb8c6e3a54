"""The OpenAI chat-completions wire format: requests in, responses, chunks and errors out.

`parse_chat_request` turns a raw request body into a validated `ChatRequest` or raises
`APIError` carrying an OpenAI-style error body (`{"error": {message, type, param, code}}`)
and a 4xx status. Responses and stream chunks are plain dicts in the shapes the official
`openai` client parses. Pure: pydantic only (no ray, torch or vllm).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP_SEQUENCES = 4
MAX_N = 8


class APIError(Exception):
    """An error answered to the client as an OpenAI-style body with `status`."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Wire(BaseModel):
    # strict: a JSON string is not a number, a number is not a string; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Wire):
    type: Literal["text"]
    text: str


class Message(Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Wire):
    include_usage: bool = False


class ChatRequest(Wire):
    """The fields of `POST /v1/chat/completions` this server honours."""

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1
    top_p: float | None = Field(None, gt=0, le=1)  # None: 1
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63 - MAX_N)  # choice i of n uses seed + i
    n: int | None = Field(None, ge=1, le=MAX_N)  # None: 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_n(self) -> ChatRequest:
        if self.stream and (self.n or 1) > 1:
            raise ValueError("n > 1 is not supported with stream=true")
        return self

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_chars(self) -> int:
        """Characters of all message texts (what the chat template wraps)."""
        return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
                   for m in self.messages)

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (`developer` is the newer name of `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a raw body; raises `APIError(400)` naming the first bad field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}",
                           code="invalid_json") from None
        if first["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object", code="invalid_type") from None
        param = field_path(first["loc"])
        # a union field fails once per branch: say all of it
        msgs = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if field_path(e["loc"]) == param)
        text = "; ".join(msgs)
        raise APIError(400, f"{param}: {text}" if param else text, param=param,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value") from None


def field_path(loc: tuple) -> str | None:
    """`("messages", 0, "content", "str")` → "messages.0.content": pydantic's union-branch tags dropped."""
    parts = [str(p) for p in loc if isinstance(p, int) or _FIELD.match(p)]
    return ".".join(parts) or None


_FIELD = re.compile(r"^(?!(str|int|float|bool)$)[a-z_]+$")


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object; `choices` are (text, finish_reason) pairs."""
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id_: str, model: str, created: int, delta: dict[str, str] | None,
          finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> str:
    """One SSE event holding a `chat.completion.chunk` (no choices when `delta` is None)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
