"""A body-size bound and an at-once `/health` in Ray Serve's HTTP proxy, in front of every replica.

Serve's proxy reads each request's whole body into memory as it arrives and forwards it to a
replica, whether or not the replica reads it: a replica alone cannot keep a 90 MB request out
of the proxy's memory. `BodyLimit` is a pure ASGI middleware that runs in each proxy:
  - a declared `Content-Length` over the limit is answered 413 before a byte of the body is read;
  - a body without one (chunked) is read up to the limit and answered 413 past it, else replayed
    to Serve;
  - a `Content-Length` that is not a byte count is answered 400.
Errors are OpenAI-style JSON bodies, as the replica's own.

`HealthWhileStarting` answers `GET /health` itself when no replica can: while a replica starts
(loading a vLLM engine takes minutes) the proxy would hold the request until one is ready, or
answer 404 before the application's route exists. Past `HEALTH_WAIT_S` without a replica's
answer, or on that 404, it answers 503 `{"status": "starting"}` with `Retry-After`; once a
replica is up, its own 200 passes through unchanged.

Serve loads proxy middlewares from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in the proxies'
environment; `controller_env(limit)` is that environment (the proxies inherit the controller's),
passed to `serve.start(controller_options=...)` by `fusion_ray.serve.app.deploy`, and written
under `controller_options` in `deployments/fused_chat.yaml` for `serve run` / `serve deploy`.
It only takes effect where Serve starts: a Serve instance already running keeps its proxies.
Pure: starlette only (no ray, torch or vllm).
"""

from __future__ import annotations

import asyncio
import json
import os

from fusion_ray.serve.protocol import APIError

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "fusion_ray.serve.proxy:middlewares"
LIMIT_ENV = "FUSION_RAY_SERVE_MAX_REQUEST_BYTES"
DEFAULT_LIMIT = 4 * 2**20  # as `serve.max_request_bytes`
DRAIN_BYTES = 256 * 2**20  # the most of a refused body read (and dropped) so that its client sees the 413
HEALTH_PATH = "/health"
HEALTH_WAIT_S = 1.0  # a ready replica answers /health in milliseconds (its event loop is never blocked)


def controller_env(limit: int) -> dict[str, str]:
    return {CALLBACK_ENV: CALLBACK, LIMIT_ENV: str(limit)}


def middlewares() -> list:
    """What Serve's proxy calls (via `CALLBACK_ENV`): the body bound, limit from `LIMIT_ENV`."""
    from starlette.middleware import Middleware

    raw = os.environ.get(LIMIT_ENV, "")
    return [Middleware(HealthWhileStarting), Middleware(BodyLimit, limit=int(raw) if raw.isdigit() else DEFAULT_LIMIT)]


class HealthWhileStarting:
    """ASGI middleware: `GET /health` answered 503 `starting` at once while no replica answers it."""

    def __init__(self, app, wait_s: float = HEALTH_WAIT_S):
        self.app, self.wait_s = app, wait_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != HEALTH_PATH or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        state = {"started": False, "no_route": False}

        async def forward(message):
            if message["type"] == "http.response.start" and message["status"] == 404:
                state["no_route"] = True  # the application's route is not there yet
            if state["no_route"]:
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, forward))
        await asyncio.wait({task}, timeout=self.wait_s)
        if state["started"]:
            return await task
        if not task.done():
            task.cancel()  # no await since the check: nothing of the replica's answer can have gone out
        elif not task.cancelled():
            task.exception()  # retrieved: a failure before any answer reads as no replica ready
        body = json.dumps({"status": "starting", "message": "no replica is ready yet; retry shortly"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"5")]})
        await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: HTTP request bodies over `limit` bytes are answered 413, unbuffered."""

    def __init__(self, app, limit: int = DEFAULT_LIMIT):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 18:
                return await reply(send, APIError(400, "the Content-Length header is not a byte count",
                                                  code="invalid_request"))
            if int(declared) > self.limit:
                err = too_large(f"the request body is {int(declared)} bytes", self.limit)
                return await reply(send, err, drain=receive if int(declared) <= DRAIN_BYTES else None)
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)  # no body
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await reply(send, too_large("the request body is over that", self.limit), drain=receive)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def too_large(what: str, limit: int) -> APIError:
    return APIError(413, f"{what}; this server takes at most {limit} bytes", code="request_too_large")


async def reply(send, err: APIError, drain=None) -> None:
    """Send `err`; with `drain` (the request's `receive`), read the rest of the body first and drop
    it, up to `DRAIN_BYTES`: a client writes its whole body before it reads the answer, and a
    connection closed under it reads as a reset, not as the 413. The response goes out before the
    drain, so a client that reads while it writes sees it at once."""
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
    if drain is None:
        return
    dropped = 0
    while dropped <= DRAIN_BYTES:
        message = await drain()
        if message["type"] != "http.request":
            break
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.body", "body": b""})
