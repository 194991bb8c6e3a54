"""Serving without a server: request validation, streamed text and stops, sampling, app options."""

import json
from pathlib import Path

import pytest
import yaml

from fusion_ray.config import ServeConfig
from fusion_ray.serve import protocol
from fusion_ray.serve.protocol import APIError
from fusion_ray.serve.text import StopText, stop_prefix_len

REPO = Path(__file__).resolve().parents[1]
OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(body) -> protocol.ChatRequest:
    return protocol.parse_chat_request(body if isinstance(body, bytes) else json.dumps(body).encode())


def test_a_full_request_parses():
    req = parse({**OK, "temperature": 0, "top_p": 0.5, "max_tokens": 7, "stop": "\n", "seed": 3, "n": 2,
                 "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                              {"role": "user", "content": "hi"}], "logit_bias": {}})
    assert req.stops() == ("\n",) and req.requested_max_tokens() == 7 and req.n == 2
    assert req.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert parse({**OK, "max_completion_tokens": 5, "max_tokens": 9}).requested_max_tokens() == 5


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_type"),
    ({"messages": OK["messages"]}, "model", "missing_required_parameter"),
    ({**OK, "messages": []}, "messages", "invalid_value"),
    ({**OK, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_value"),
    ({**OK, "max_tokens": "5"}, "max_tokens", "invalid_value"),
    ({**OK, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**OK, "temperature": "hot"}, "temperature", "invalid_value"),
    ({**OK, "temperature": 3}, "temperature", "invalid_value"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({**OK, "stream": "yes"}, "stream", "invalid_value"),
    ({**OK, "stream": True, "n": 2}, None, "invalid_value"),
    ({**OK, "seed": -1}, "seed", "invalid_value"),
    ({**OK, "seed": 2**64}, "seed", "invalid_value"),
])
def test_bad_requests_are_400_with_an_openai_error_body(body, param, code):
    with pytest.raises(APIError) as err:
        parse(body)
    assert err.value.status == 400
    error = err.value.body()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code
    assert error["param"] == param and error["message"]


def test_chunks_and_completions_have_the_openai_shape():
    event = protocol.chunk("id1", "m", 1, {"content": "hi"}, "stop")
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: "):])
    assert body["object"] == "chat.completion.chunk" and body["choices"][0]["delta"] == {"content": "hi"}
    usage_only = json.loads(protocol.chunk("id1", "m", 1, None, usage_=protocol.usage(3, 4))[6:])
    assert usage_only["choices"] == [] and usage_only["usage"]["total_tokens"] == 7
    done = protocol.completion("id2", "m", [("a", "stop"), ("b", "length")], 3, 5)
    assert [c["message"]["content"] for c in done["choices"]] == ["a", "b"]
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_stop_prefix_len():
    assert stop_prefix_len("hello wo", ["world"]) == 2
    assert stop_prefix_len("hello", ["world"]) == 0
    assert stop_prefix_len("abab", ["abc", "b"]) == 2


def feed_all(pieces, stops, final_at_end=True):
    st, out = StopText(stops), []
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        out.append(st.feed(text, final=final_at_end and i == len(pieces) - 1))
        if st.stopped:
            break
    return out, st.stopped


def test_stream_never_sends_a_possible_stop_and_cuts_before_it():
    out, stopped = feed_all(["Hel", "lo E", "N", "D!"], ["END"])
    assert out == ["Hel", "lo ", "", ""] and stopped
    out, stopped = feed_all(["Hel", "lo E", "x"], ["END"])
    assert "".join(out) == "Hello Ex" and not stopped
    out, _ = feed_all(["a", "\ufffd"], [], final_at_end=False)  # half a character is held back
    assert out == ["a", ""]


def test_greedy_and_nucleus_sampling():
    torch = pytest.importorskip("torch")
    from fusion_ray.serve.engines import Sampling, next_token

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, Sampling(max_tokens=1, temperature=0), None) == 1
    assert next_token(logits, Sampling(max_tokens=1, temperature=1e-30), None) == 1
    gen = torch.Generator().manual_seed(0)
    draws = {next_token(logits, Sampling(max_tokens=1, top_p=0.5), gen) for _ in range(50)}
    assert draws == {1}  # top_p keeps only the top token (p≈0.51)
    draws = {next_token(logits, Sampling(max_tokens=1, temperature=1.0), gen) for _ in range(200)}
    assert {1, 2} <= draws


def test_vllm_returns_a_reply_not_streamed_once_and_a_stream_per_step():
    pytest.importorskip("vllm")
    from vllm.sampling_params import RequestOutputKind

    from fusion_ray.serve.engines import Sampling, VLLMChatEngine

    whole = VLLMChatEngine.params(Sampling(max_tokens=8, temperature=0, stop=("\n",), seed=3, stream=False))
    assert whole.output_kind == RequestOutputKind.FINAL_ONLY
    assert (whole.max_tokens, whole.temperature, whole.stop, whole.seed) == (8, 0, ["\n"], 3)
    assert VLLMChatEngine.params(Sampling(max_tokens=8)).output_kind == RequestOutputKind.DELTA


def test_replica_bounds_are_checked():
    with pytest.raises(ValueError, match="min_replicas <= num_replicas <= max_replicas"):
        ServeConfig(min_replicas=2, num_replicas=1, max_replicas=4)


def test_deployment_options_fixed_and_autoscaling():
    from fusion_ray.serve.app import ServeArgs, deployment_options

    fixed = deployment_options(ServeArgs(model_dir="x", num_replicas=2, min_replicas=2, max_replicas=2))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    auto = deployment_options(ServeArgs(model_dir="x", min_replicas=1, max_replicas=4, num_gpus=1,
                                        accelerator_type="A100"))
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
    assert auto["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A100"}
    assert auto["logging_config"] == {"enable_access_log": True}


def test_serve_yaml_is_a_valid_serve_config_that_builds(tiny_models, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from fusion_ray.serve.app import build_app

    config = yaml.safe_load((REPO / "deployments" / "fused_chat.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "fusion_ray.serve.app:build_app" and app_cfg.route_prefix == "/"
    from fusion_ray.serve.proxy import controller_env

    # the proxies get the body bound, at the application's limit
    assert schema.controller_options.runtime_env["env_vars"] == controller_env(app_cfg.args["max_request_bytes"])
    args = {**app_cfg.args, "model_dir": str(tiny_models()), "api_key_env": "FUSION_RAY_TEST_KEY"}
    with pytest.raises(ValueError, match="FUSION_RAY_TEST_KEY"):
        build_app(args)
    monkeypatch.setenv("FUSION_RAY_TEST_KEY", "sekrit")
    deployment = build_app(args)._bound_deployment
    assert deployment.name == "FusedChat" and deployment.max_ongoing_requests == 64
    assert deployment.init_args[0]["api_key"] == "sekrit"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_app({**args, "model_dir": str(REPO)})


def test_cli_serve_is_wired():
    from fusion_ray.cli import build_parser, cmd_serve

    args = build_parser().parse_args(["serve", "some/dir", "--engine", "hf", "--port", "9001", "--api-key", "k"])
    assert args.fn is cmd_serve and (args.engine, args.port, args.api_key) == ("hf", 9001, "k")
    args = build_parser().parse_args(["serve", "base", "--adapter", "arm-a=/x/a", "--adapter", "arm-b=s3://b/c=d"])
    assert args.adapter == [("arm-a", "/x/a"), ("arm-b", "s3://b/c=d")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "base", "--adapter", "no-dir"])


def test_cli_serve_refuses_a_dir_that_is_no_model(tmp_path, capsys):
    from fusion_ray.cli import EXIT_BAD_INPUT, main

    assert main(["serve", str(tmp_path), "--engine", "hf"]) == EXIT_BAD_INPUT
    assert "not an HF model dir" in capsys.readouterr().err


def test_run_ends_with_serve_when_deploy_after_merge(monkeypatch, tmp_path):
    from fusion_ray import cli, pipeline
    from fusion_ray.contract import StageResult

    ran, served = [], []
    monkeypatch.setattr(pipeline, "check_run", lambda cfg, stages: None)
    monkeypatch.setattr(pipeline, "run_stages", lambda cfg, stages, force=False, checked=False: ran.extend(stages) or
                        {s: StageResult("deployed", figures={"url": "http://x/v1"}) for s in stages})
    monkeypatch.setattr(cli, "serve_until_interrupted", served.append)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config, workdir = str(REPO / "jobs" / "configs" / "tiny_cpu.yaml"), f"workdir={tmp_path}"
    assert cli.main(["run", config, workdir, "--stages", "prepare"]) == 0 and ran == ["prepare"] and not served
    assert cli.main(["run", config, workdir, "serve.deploy_after_merge=true"]) == 0
    assert ran[-1] == "serve" and ran.count("serve") == 1 and served == ["http://x/v1"]


def test_pure_serve_modules_load_no_engine():
    import subprocess
    import sys

    probe = ("import fusion_ray.serve, fusion_ray.serve.protocol, fusion_ray.serve.text, fusion_ray.serve.stage, sys\n"
             "print([m for m in ('vllm', 'ray', 'torch', 'transformers', 'fastapi') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# --- hostile bodies: the validator answers APIError or a request, nothing else ------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
          "stream", "stream_options", "user"]


def outcome(body: bytes):
    try:
        return protocol.parse_chat_request(body)
    except APIError as err:
        assert 400 <= err.status < 500 and err.body()["error"]["message"]
        return err


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_are_a_request_or_an_api_error(body):
    outcome(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6), st.booleans())
def test_fuzz_any_json_in_any_field_is_a_request_or_an_api_error(fields, with_base):
    body = {**OK, **fields} if with_base else fields
    result = outcome(json.dumps(body, allow_nan=True).encode())
    if isinstance(result, protocol.ChatRequest):  # what passes is what the server can use as is
        assert result.messages and all(isinstance(m.text(), str) for m in result.messages)
        assert result.top_p is None or 0 < result.top_p <= 1
        assert result.temperature is None or 0 <= result.temperature <= 2
        assert result.prompt_chars() == sum(len(m.text()) for m in result.messages)


LONE_SURROGATE = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"model":' + b"[" * 200_000, b'{"a":' * 100_000,
                                  b"\xff\xfe{}", LONE_SURROGATE])
def test_deep_nesting_and_bad_encodings_are_400(body):
    result = outcome(body)
    assert isinstance(result, APIError) or result.messages


def test_longest_token_bounds_the_tokens_of_any_text(tmp_path):
    """chars / longest_token_chars never exceeds the token count (the prompt bound is never wrong)."""
    from fusion_ray.demo.tokenizers import build_tokenizer
    from fusion_ray.serve.app import longest_token_chars

    for family in ("gpt2", "mistral", "deepseek"):
        tok = build_tokenizer(family, 512, tmp_path / family)
        longest = longest_token_chars(tok)
        assert 1 < longest < 64
        texts = ["a" * 5000, " " * 3000, "\n" * 999, "<|im_start|>" * 50, "ünïcödé 漢字 " * 300,
                 "def f(x):\n        return x\n" * 40, "".join(chr(c) for c in range(32, 3000))]
        for text in texts:
            assert len(tok(text, add_special_tokens=False)["input_ids"]) * longest >= len(text), (family, text[:20])


def test_proxy_body_limit_refuses_unread_and_replays_what_it_buffered():
    """The proxy middleware: a declared length over the limit never reaches the app; a chunked
    body is counted as it comes and, under the limit, handed on whole."""
    import asyncio

    import httpx

    from fusion_ray.serve.proxy import BodyLimit

    seen = []

    async def echo(scope, receive, send):  # the app behind the proxy: the length of what it read
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    async def chunks(n, size=1000):
        for _ in range(n):
            yield b"x" * size

    async def main():
        transport = httpx.ASGITransport(app=BodyLimit(echo, limit=10_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            small = await http.post("/", content=b"y" * 10_000)
            big = await http.post("/", content=b"y" * 10_001)
            chunked_ok = await http.post("/", content=chunks(10))
            chunked_big = await http.post("/", content=chunks(11))
            bad_length = await http.post("/", content=b"{}", headers={"Content-Length": "-1"})
            return small, big, chunked_ok, chunked_big, bad_length

    small, big, chunked_ok, chunked_big, bad_length = asyncio.run(main())
    assert small.status_code == 200 and small.text == "10000"
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert chunked_ok.status_code == 200 and chunked_ok.text == "10000"
    assert chunked_big.status_code == 413
    assert bad_length.status_code == 400
    assert seen == [10_000, 10_000]  # the refused bodies never reached the app


def test_proxy_answers_health_at_once_while_no_replica_can():
    """While a replica starts, Serve's proxy holds a request until one is ready (minutes for a vLLM
    engine) or answers 404 before the application's route exists: `/health` is then 503
    `starting` within the wait, with Retry-After. A ready replica's answer passes through, as does
    every other route, however slow."""
    import asyncio
    import time

    import httpx

    from fusion_ray.serve.proxy import HealthWhileStarting, middlewares

    state = {"phase": "no route"}

    async def serve_app(scope, receive, send):  # what Serve's proxy does behind the middleware
        if state["phase"] == "no route":
            status, body = 404, b"Path '/health' not found."
        elif state["phase"] == "starting":
            await asyncio.sleep(30)  # held until a replica is ready
            status, body = 200, b"{}"
        else:
            await asyncio.sleep(0.05 if scope["path"] == "/health" else 1.5)
            status, body = 200, b'{"status": "ok"}'
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main():
        transport = httpx.ASGITransport(app=HealthWhileStarting(serve_app, wait_s=0.3))
        out = {}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for phase in ("no route", "starting", "ready"):
                state["phase"] = phase
                t0 = time.perf_counter()
                out[phase] = (await http.get("/health"), time.perf_counter() - t0)
            t0 = time.perf_counter()
            out["slow route"] = (await http.get("/v1/models"), time.perf_counter() - t0)
        return out

    out = asyncio.run(main())
    for phase in ("no route", "starting"):
        reply, seconds = out[phase]
        assert reply.status_code == 503 and reply.json()["status"] == "starting", phase
        assert reply.headers["retry-after"] and seconds < 1.0, (phase, seconds)
    assert out["ready"][0].status_code == 200 and out["ready"][0].json() == {"status": "ok"}
    assert out["slow route"][0].status_code == 200 and out["slow route"][1] >= 1.5, "other routes are not cut short"
    assert [m.cls for m in middlewares()][0] is HealthWhileStarting
