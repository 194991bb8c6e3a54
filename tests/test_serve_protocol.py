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


def test_cli_serve_refuses_a_dir_that_is_no_model(tmp_path, capsys):
    from fusion_ray.cli import EXIT_BAD_INPUT, main

    assert main(["serve", str(tmp_path), "--engine", "hf"]) == EXIT_BAD_INPUT
    assert "not an HF model dir" in capsys.readouterr().err


def test_run_ends_with_serve_when_deploy_after_merge(monkeypatch):
    from fusion_ray import cli, pipeline

    ran, served = [], []
    monkeypatch.setattr(pipeline, "run_stages", lambda cfg, stages, force=False: ran.extend(stages) or
                        {s: {"url": "http://x/v1"} for s in stages})
    monkeypatch.setattr(cli, "serve_until_interrupted", served.append)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = str(REPO / "jobs" / "configs" / "tiny_cpu.yaml")
    assert cli.main(["run", config, "--stages", "prepare"]) == 0 and ran == ["prepare"] and not served
    assert cli.main(["run", config, "serve.deploy_after_merge=true"]) == 0
    assert ran[-1] == "serve" and ran.count("serve") == 1 and served == ["http://x/v1"]


def test_pure_serve_modules_load_no_engine():
    import subprocess
    import sys

    probe = ("import fusion_ray.serve, fusion_ray.serve.protocol, fusion_ray.serve.text, fusion_ray.serve.stage, sys\n"
             "print([m for m in ('vllm', 'ray', 'torch', 'transformers', 'fastapi') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
