"""The live endpoint on loopback, through the official `openai` client, for each engine.

One deployment per engine (module-scoped, `hf` first, then `vllm` where it is installed),
started by the pipeline's serve stage on a tiny model copied to `merged/`, with an API key.
Serve is shut down and the engines' leftovers in /dev/shm and /tmp removed at teardown.
"""

import asyncio
import glob
import json
import os
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
from helpers import chat_rows, make_config, write_jsonl

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KEY = "test-key-123"
KEY_ENV = "FUSION_RAY_TEST_SERVE_KEY"
CAP, CONTEXT = 400, 256
MSGS = [{"role": "user", "content": "What is a compiler?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers() -> set[str]:
    """vLLM's shared-memory segments and ZMQ sockets (uuid-named, in /tmp)."""
    sockets = {p for p in glob.glob("/tmp/*-*-*-*-*") if Path(p).is_socket()}
    return set(glob.glob("/dev/shm/psm_*")) | sockets


def engines() -> list:
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except ImportError:
        has_vllm = False
    return ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not has_vllm, reason="vLLM not installed"))]


@pytest.fixture(scope="module", params=engines())
def server(request, tiny_models, tmp_path_factory, ray_local):
    """(base_url, model_id, engine) of a running deployment."""
    from ray import serve

    from fusion_ray.serve import stage

    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    corpus = write_jsonl(tmp / "c.jsonl", chat_rows(2))
    model = tiny_models("qwen2", "gpt2")
    serve_cfg = {"engine": request.param, "port": free_port(), "api_key_env": KEY_ENV, "num_cpus": 0.5,
                 "max_tokens_cap": CAP, "max_model_len": CONTEXT, "dtype": "float32", "model_id": "tiny-chat"}
    cfg = make_config(tmp / "work", model, {"src": model}, [corpus], serve=serve_cfg)
    shutil.copytree(model, cfg.stage_dir("merge"))
    before = leftovers()
    os.environ[KEY_ENV] = KEY
    try:
        result = stage.run(cfg, log=lambda *_: None)
        yield result["url"], result["model"], request.param
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()
        for leftover in leftovers() - before:
            Path(leftover).unlink(missing_ok=True)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def health(server) -> dict:
    out = httpx.get(server[0].removesuffix("/v1") + "/health", timeout=10)
    assert out.status_code == 200
    return out.json()


def test_chat_completion_with_usage(server, client):
    out = client.chat.completions.create(model=server[1], messages=MSGS, max_tokens=12, temperature=0)
    (choice,) = out.choices
    assert out.object == "chat.completion" and out.model == server[1]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 5 and 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stream_concatenates_to_the_greedy_completion(server, client):
    kwargs = dict(model=server[1], messages=MSGS, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    stop = [whole.choices[0].message.content[6:8]]
    cut = client.chat.completions.create(**kwargs, stop=stop).choices[0].message.content
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_sse_wire_format_ends_with_done(server):
    body = {"model": server[1], "messages": MSGS, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server[0] + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_sampling_fields_are_honoured(server, client):
    kwargs = dict(model=server[1], messages=MSGS, max_tokens=24)
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    stop = greedy[4:7]
    cut = client.chat.completions.create(**kwargs, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.find(stop)] and cut.finish_reason == "stop"
    seeded = [client.chat.completions.create(**kwargs, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    two = client.chat.completions.create(**kwargs, temperature=1.0, seed=1, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens >= 2
    one = client.chat.completions.create(**{**kwargs, "max_tokens": 1}, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason in ("length", "stop")


def test_models_route(server, client):
    (model,) = client.models.list().data
    assert model.id == server[1] and model.object == "model"


BAD = [  # (request kwargs, expected exception, param)
    (dict(messages=[]), openai.BadRequestError, "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), openai.BadRequestError, "messages.0.role"),
    (dict(max_tokens="ten"), openai.BadRequestError, "max_tokens"),
    (dict(temperature="hot"), openai.BadRequestError, "temperature"),
    (dict(messages=[{"role": "user", "content": 42}]), openai.BadRequestError, "messages.0.content"),
    (dict(model="no-such-model"), openai.NotFoundError, "model"),
    (dict(max_tokens=CAP + 1), openai.BadRequestError, "max_tokens"),
    (dict(max_tokens=CONTEXT - 5), openai.BadRequestError, "max_tokens"),  # prompt + reply > context
    (dict(messages=[{"role": "user", "content": "word " * CONTEXT}]), openai.BadRequestError, "messages"),
]


@pytest.mark.parametrize("kwargs, error, param", BAD, ids=lambda v: None)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client, kwargs, error, param):
    with pytest.raises(error) as err:
        client.chat.completions.create(**{"model": server[1], "messages": MSGS, "max_tokens": 4, **kwargs})
    assert 400 <= err.value.status_code < 500
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    assert health(server)["status"] == "ok"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_is_400(server, body):
    resp = httpx.post(server[0] + "/chat/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert health(server)["status"] == "ok"


def test_unknown_routes_get_json_errors(server):
    missing = httpx.get(server[0] + "/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    wrong_method = httpx.get(server[0] + "/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_401_without_the_key(server):
    bad = openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=server[1], messages=MSGS, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    resp = httpx.get(server[0] + "/models", timeout=10)  # no Authorization header at all
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "invalid_request_error"


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": server[1], "messages": MSGS, "max_tokens": CONTEXT - 40, "temperature": 0,
            "stream": True, "stop": ["\x00never"]}
    aborted = health(server)["aborted_requests"]
    with httpx.stream("POST", server[0] + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert health(server)["active_requests"] == 1
    deadline = time.monotonic() + 30
    while health(server)["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health(server)["active_requests"] == 0
    assert health(server)["aborted_requests"] == aborted + 1  # stopped early, not run to the end
    out = openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0).chat.completions.create(
        model=server[1], messages=MSGS, max_tokens=3)
    assert out.choices[0].message.content is not None


def test_50_concurrent_requests_all_succeed(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)
        async with client:
            tasks = [client.chat.completions.create(
                model=server[1], messages=[{"role": "user", "content": f"Tell me about item {i}."}],
                max_tokens=8, temperature=0.7, seed=i) for i in range(50)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(1 <= r.usage.completion_tokens <= 8 for r in results)
    assert health(server)["active_requests"] == 0
