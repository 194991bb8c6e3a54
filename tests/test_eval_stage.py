"""The eval stage: held-out bpb per arm and domain, the report files, and the optional judge."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from helpers import chat_rows, make_config, write_jsonl

from fusion_ray import io
from fusion_ray.evaluate import stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
QUIET = lambda *_: None  # noqa: E731


class Judge(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible judge: rates 7, except answers it cannot parse."""

    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        Judge.seen.append((self.path, self.headers.get("Authorization"), prompt))
        text = "Fine. Rating: [[7]]" if "case 1" not in prompt else "I cannot rate this."
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_eval_scores_every_arm_and_writes_the_report(tiny_models, tmp_path, ray_local, judge_url, monkeypatch):
    train = write_jsonl(tmp_path / "t.jsonl", chat_rows(4))
    comp = write_jsonl(tmp_path / "c.jsonl", chat_rows(6, "computing", start=100))
    eng = write_jsonl(tmp_path / "e.jsonl", chat_rows(5, "english", start=200))
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is a parser (case 0)?"},
                                                 {"question": "What is a kernel (case 1)?"}])
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [train], eval={"judge_url": judge_url, "judge_model": "judge", "judge_prompts": str(prompts),
                                     "judge_api_key_env": "JUDGE_KEY", "judge_max_new_tokens": 4,
                                     "judge_arms": ["pivot"], "num_cpus": 0.5})
    cfg.data.heldout = [type(cfg.data.train[0])(path=str(comp), domain="computing"),
                        type(cfg.data.train[0])(path=str(eng), domain="english")]
    result = stage.run(cfg, log=QUIET)
    report = json.loads(open(f"{result.dir}/report.json").read())
    assert set(report["bpb"]) == {"source:gpt", "pivot"}, "no trained arms exist yet: only these"
    for values in report["bpb"].values():
        assert set(values) == {"computing", "english"}
        assert all(2.0 < v < 20.0 for v in values.values()), values  # untrained 512-token models
    assert report["bpb"]["pivot"] != report["bpb"]["source:gpt"]
    assert open(f"{result.dir}/report.png", "rb").read(4) == b"\x89PNG"
    assert "| pivot |" in open(f"{result.dir}/report.md").read()
    # the judge: every pivot answer graded over real HTTP with the key; unparseable ratings counted
    assert report["judge"]["pivot"]["mean"] == 7.0 and report["judge"]["pivot"]["n"] == 1
    assert report["judge"]["pivot"]["unrated"] == 1
    assert all(p == "/v1/chat/completions" and auth == "Bearer sekret" for p, auth, _ in Judge.seen)
    assert any("What is a parser (case 0)?" in prompt for *_, prompt in Judge.seen)
    assert io.read_manifest(result.dir)["rows"] == {"computing": 6, "english": 5}
    assert stage.run(cfg, log=QUIET).status == "skipped"


def test_bad_heldout_row_is_named(tiny_models, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat_rows(1)[0], "{not json"])
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [bad])
    cfg.data.heldout = [type(cfg.data.train[0])(path=str(bad), domain="x")]
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: invalid JSON"):
        stage.heldout(cfg)
