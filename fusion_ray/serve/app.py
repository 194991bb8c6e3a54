"""The Ray Serve application: an OpenAI-compatible chat endpoint over one HF chat model dir.

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`
(open, with the engine's count of requests in flight). The replica applies the model's
chat template, validates each request (OpenAI-style 4xx bodies for bad input, never a
crash), checks the optional bearer token and runs an engine of `fusion_ray.serve.engines`.
`build_app(args)` is the import path of `serve run` / `serve deploy` configs
(`deployments/fused_chat.yaml`); `deploy(args)` starts it on the current Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from fusion_ray.config import RayConfig, ServeConfig
from fusion_ray.placement import serve_placement
from fusion_ray.serve import protocol
from fusion_ray.serve.engines import ChatEngine, Sampling
from fusion_ray.serve.protocol import APIError
from fusion_ray.serve.proxy import controller_env

APP_NAME = "fused_chat"
DEPLOYMENT_NAME = "FusedChat"
API_KEY_ENV = "FUSION_RAY_API_KEY"  # what `fusion-ray serve` reads when --api-key is absent

app = FastAPI(title="fusion_ray chat", docs_url=None, redoc_url=None, openapi_url=None)


class ServeArgs(ServeConfig):
    """`ServeConfig` plus what one deployment needs: the model dir and a resolved key."""

    model_dir: str
    api_key: str | None = None

    def resolved(self) -> ServeArgs:
        """The model checked (a local dir, object-store URI, hub id or demo asset, `config.json`
        readable without fetching weights), `api_key_env` read here. Each replica makes its
        node-local copy itself (`local_model_dir`)."""
        from fusion_ray import locations

        model_dir = self.model_dir
        if locations.kind(model_dir) in ("local", "demo"):  # demo assets are built here, once
            model_dir = str(Path(locations.local_dir(model_dir)).resolve())
        if locations.model_config(model_dir) is None:
            why = locations.reachable(model_dir) or "no config.json there"
            raise FileNotFoundError(f"not an HF model dir ({why}): {model_dir}")
        key = self.api_key
        if key is None and self.api_key_env:
            if self.api_key_env not in os.environ:
                raise ValueError(f"serve.api_key_env names {self.api_key_env}, which is not set")
            key = os.environ[self.api_key_env]
        model_id = self.model_id or model_dir.rstrip("/").rsplit("/", 1)[-1]
        if model_id in self.adapters:
            raise ValueError(f"serve.adapters: {model_id!r} is the base's model id; give the adapter another name")
        adapters = {name: checked_adapter(path, self.model_dir, model_dir) for name, path in self.adapters.items()}
        return self.model_copy(update={"model_dir": model_dir, "api_key": key, "model_id": model_id,
                                       "adapters": adapters})

    def local_model_dir(self) -> ServeArgs:
        """The same args with `model_dir` on this node's disk (copied once from a store or the hub)."""
        from fusion_ray import locations

        return self.model_copy(update={"model_dir": locations.local_dir(self.model_dir),
                                       "adapters": {n: locations.local_dir(p) for n, p in self.adapters.items()}})


def checked_adapter(path: str, model_ref: str, model_dir: str) -> str:
    """`path` (a local one resolved; a store or hub one as given: each replica copies it) when it is
    a LoRA adapter dir whose `base_model_name_or_path` is the served model: the same local dir
    (`model_dir`, resolved) or the same hub id / URI (`model_ref`).

    Raises:
        ValueError: naming the adapter's config file and both bases, or the missing file.
    """
    from fusion_ray import locations
    from fusion_ray.checkpoint.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
    from fusion_ray.checkpoint.streaming import CheckpointError

    try:
        local = str(Path(locations.local_dir(path)).resolve())
    except (OSError, ValueError) as err:
        raise ValueError(f"serve.adapters: cannot read the adapter {path} ({err})") from None
    config = Path(local) / ADAPTER_CONFIG
    for needed in (config, Path(local) / ADAPTER_WEIGHTS):
        if not needed.is_file():
            raise ValueError(f"serve.adapters: {path} is not a LoRA adapter dir (no {needed.name} at {needed})")
    try:  # the reader merge uses: a LoRA adapter config that names its base, or an error naming the file
        base, _ = LoraAdapter.read_config(Path(local))
    except CheckpointError as err:
        raise ValueError(f"serve.adapters: {err}") from None
    if locations.kind(base) in ("local", "demo"):
        try:
            same = Path(locations.local_dir(base)).resolve() == Path(model_dir).resolve()
        except (OSError, ValueError):
            same = False
    else:
        same = base.rstrip("/") == model_ref.rstrip("/")
    if not same:
        raise ValueError(f"serve.adapters: {config} names base model {base}, but this deployment serves "
                         f"{model_ref}; an adapter is served only on the base it was trained on")
    return local if locations.kind(path) in ("local", "demo") else path


# the helpers of ChatServer are defined above it: `serve.ingress` copies the class with the
# globals it sees then
def make_engine(args: ServeArgs, tokenizer) -> ChatEngine:
    if args.engine == "vllm":
        from fusion_ray.serve.engines import VLLMChatEngine

        options = {**serve_placement(args).engine_options(), **args.engine_options}  # the user's choice wins
        return VLLMChatEngine(args.model_dir, dtype=args.dtype, max_model_len=args.max_model_len, options=options,
                              adapters=args.adapters)
    from fusion_ray.serve.engines import HFChatEngine

    return HFChatEngine(args.model_dir, tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                        adapters=args.adapters)


LARGE_BODY_BYTES = 1 << 20  # after a body this large, free memory is handed back to the OS
TOP_P_FLOOR = 1e-6


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request, at most `limit` bytes.

    Raises:
        APIError: 415 when the Content-Type is not `application/json`; 413 when the declared
            length is over `limit` (before a byte is read) or the body grows past it (chunked).
    """
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be JSON (Content-Type: application/json), "
                       f"got {media[:80] or 'no Content-Type'}", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18):
        raise APIError(400, "the Content-Length header is not a byte count", code="invalid_request")
    if declared is not None and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of the vocabulary (added tokens too) can stand for: a prompt
    of C characters is at least C / this many tokens. Byte-level pieces count one character per
    byte, so the bound holds for any text."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so a large body does not leave the
    replica's memory high."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@app.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
    return await _api_error(_, APIError(err.status_code, str(err.detail), code=str(err.status_code)))


@app.exception_handler(Exception)
async def _server_error(_: Request, err: Exception) -> JSONResponse:  # a bug or a dead engine: still JSON
    return await _api_error(_, APIError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error"))


@serve.deployment
@serve.ingress(app)
class ChatServer:
    """One replica: tokenizer (chat template) + engine."""

    def __init__(self, args: dict):
        from fusion_ray import tokenizer as tokenizers

        self.args = ServeArgs.model_validate(args).local_model_dir()
        self.tokenizer = tokenizers.from_dir(self.args.model_dir)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.args.model_dir} has no chat template")
        self.engine = make_engine(self.args, self.tokenizer)
        self.max_prompt_chars = self.args.max_prompt_chars or (
            self.engine.max_model_len * longest_token_chars(self.tokenizer))
        self.created = int(time.time())

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.args.model_id, "engine": self.args.engine,
                "active_requests": self.engine.active, "aborted_requests": self.engine.aborted}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        # the base first, then each adapter by its name (`parent`: the base it runs on)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "fusion_ray",
             "max_model_len": self.engine.max_model_len,
             **({"parent": self.args.model_id} if name != self.args.model_id else {})}
            for name in [self.args.model_id, *self.args.adapters]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await read_body(request, self.args.max_request_bytes)
        # parsing, templating and tokenising run on a worker thread: the event loop stays free
        # for /health and the streams of other requests while a large body is handled
        req, prompt_ids = await asyncio.to_thread(self._prepare, body)
        sampling = self._sampling(req, len(prompt_ids))
        rid = protocol.new_id()
        adapter = None if req.model == self.args.model_id else req.model  # a LoRA adapter by name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(prompt_ids, sampling, rid, include_usage, adapter),
                                     media_type="text/event-stream")
        n = req.n or 1
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(n)]
        done = await asyncio.gather(*(self._complete(prompt_ids, dataclasses.replace(sampling, seed=s),
                                                     f"{rid}-{i}", adapter) for i, s in enumerate(seeds)))
        return protocol.completion(rid, req.model, [(t, r) for t, r, _ in done],
                                   len(prompt_ids), sum(k for _, _, k in done))

    async def check_health(self) -> None:  # Serve's replica health check
        await self.engine.check_health()

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.close()

    def _authorize(self, request: Request) -> None:
        if self.args.api_key is None:
            return
        # exact and in constant time: no stripping, no case folding of the key
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                                                 self.args.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send `Authorization: Bearer KEY`)",
                           code="invalid_api_key")

    def _prepare(self, body: bytes) -> tuple[protocol.ChatRequest, list[int]]:
        """The validated request and its prompt token ids (on a worker thread)."""
        try:
            req = protocol.parse_chat_request(body)
            if req.model != self.args.model_id and req.model not in self.args.adapters:
                served = ", ".join(repr(m) for m in [self.args.model_id, *self.args.adapters])
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                               f"{served}", param="model", code="model_not_found")
            chars = req.prompt_chars()
            if chars > self.max_prompt_chars:
                raise APIError(400, f"the messages hold {chars} characters; this server takes at most "
                               f"{self.max_prompt_chars} (its context is {self.engine.max_model_len} tokens)",
                               param="messages", code="context_length_exceeded")
            return req, self._prompt(req)
        finally:
            if len(body) > LARGE_BODY_BYTES:
                trim_heap()

    def _prompt(self, req: protocol.ChatRequest) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # e.g. a template that insists on alternating roles
            raise APIError(400, f"the model's chat template rejects these messages: {err}",
                           param="messages", code="invalid_value") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _sampling(self, req: protocol.ChatRequest, prompt_len: int) -> Sampling:
        limit, cap = self.engine.max_model_len, self.args.max_tokens_cap
        wanted = req.requested_max_tokens()
        if wanted is not None and wanted > cap:
            raise APIError(400, f"max_tokens is {wanted}; this server allows at most {cap}",
                           param="max_tokens", code="invalid_value")
        room = limit - prompt_len
        if room < 1 or (wanted is not None and wanted > room):
            raise APIError(400, f"this model's context length is {limit} tokens; the messages take "
                           f"{prompt_len} and max_tokens asks for {wanted or 1} more",
                           param="messages" if room < 1 else "max_tokens", code="context_length_exceeded")
        # a top_p below TOP_P_FLOOR keeps the top token only, as TOP_P_FLOOR does (no vocabulary has
        # 10^6 tokens); clamping keeps it from underflowing to 0 in an engine's float32
        return Sampling(max_tokens=wanted or min(cap, room),
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else max(req.top_p, TOP_P_FLOOR),
                        stop=req.stops(), seed=req.seed, stream=bool(req.stream))

    async def _complete(self, prompt_ids: list[int], sampling: Sampling, rid: str,
                        adapter: str | None = None) -> tuple[str, str, int]:
        parts, reason, tokens = [], "length", 0
        async for delta in self.engine.generate(prompt_ids, sampling, rid, adapter):
            parts.append(delta.text)
            tokens, reason = delta.tokens, delta.finish_reason or reason
        return "".join(parts), reason, tokens

    async def _stream(self, prompt_ids: list[int], sampling: Sampling, rid: str, include_usage: bool,
                      adapter: str | None = None):
        model, created, tokens = adapter or self.args.model_id, int(time.time()), 0
        yield protocol.chunk(rid, model, created, {"role": "assistant", "content": ""})
        try:
            async for delta in self.engine.generate(prompt_ids, sampling, rid, adapter):
                tokens = delta.tokens
                if delta.text:
                    yield protocol.chunk(rid, model, created, {"content": delta.text})
                if delta.finish_reason:
                    yield protocol.chunk(rid, model, created, {}, delta.finish_reason)
        except Exception as err:  # the status line is sent: report the failure inside the stream
            yield protocol.sse(APIError(500, f"generation failed: {err}", type_="server_error").body())
        if include_usage:
            yield protocol.chunk(rid, model, created, None, usage_=protocol.usage(len(prompt_ids), tokens))
        yield protocol.SSE_DONE


def deployment_options(args: ServeArgs) -> dict:
    """Replicas (fixed, or autoscaling between the bounds), resources and accelerator type.

    Resources follow `fusion_ray.placement.serve_placement`: a replica of an engine with
    `tensor_parallel_size` TP > 1 on GPUs asks for TP GPUs itself (vLLM's `mp` executor); with
    `pipeline_parallel_size` > 1 the replica gets Serve's `placement_group_bundles` (one GPU per
    rank, the replica's CPUs in bundle 0) with `placement_group_strategy` PACK, and vLLM's Ray
    executor places its ranks in the replica's placement group.
    """
    placement = serve_placement(args)
    opts: dict = {"name": DEPLOYMENT_NAME, "max_ongoing_requests": args.max_ongoing_requests,
                  "ray_actor_options": placement.actor_options(),
                  "logging_config": {"enable_access_log": args.access_log}}
    if placement.bundles:
        opts["placement_group_bundles"] = [dict(b) for b in placement.bundles]
        opts["placement_group_strategy"] = placement.strategy
    if args.min_replicas == args.max_replicas:
        opts["num_replicas"] = args.num_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                      "initial_replicas": args.num_replicas,
                                      "target_ongoing_requests": max(1, args.max_ongoing_requests // 2)}
    return opts


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy`: `args` are `ServeArgs` fields."""
    resolved = ServeArgs.model_validate(args).resolved()
    return ChatServer.options(**deployment_options(resolved)).bind(resolved.model_dump())


def deploy(args: dict, ray_cfg: RayConfig | None = None) -> str:
    """Run the application on the current (or a new local) Ray; returns the base URL (`…/v1`)."""
    from fusion_ray.ray_env import init_ray

    application = build_app(args)
    init_ray(ray_cfg)
    parsed = ServeArgs.model_validate(args)
    serve.start(http_options={"host": parsed.host, "port": parsed.port},
                logging_config={"enable_access_log": parsed.access_log},
                # each proxy bounds request bodies before it buffers them (fusion_ray.serve.proxy)
                controller_options={"runtime_env": {"env_vars": controller_env(parsed.max_request_bytes)}})
    serve.run(application, name=APP_NAME, route_prefix="/")
    return f"http://{parsed.host}:{parsed.port}/v1"
