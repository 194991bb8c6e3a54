"""Chat evaluation, part 1: the question file (`evaluate/questions.py`) and every arm's answers,
turn by turn (`evaluate/answers.py`): on local Ray with the hf engine for model arms, and through
the `openai` client against a deterministic OpenAI-compatible stand-in on loopback.

vLLM is not exercised here (an engine start costs ~30-60 s on this machine, over the suite's
budget for this part); `bench/eval.py` answers through it."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fusion_ray.evaluate.questions import QuestionFileError, parse_questions, read_questions
from tests.helpers import chat_rows, make_config, write_jsonl

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rivers.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 plus 3?", "And times 4?"],
     "reference": ["5", "20"]},
    {"question_id": "solo", "category": "roleplay", "turns": ["Say hello."]},
]


def _config(tmp_path: Path, pivot: Path, questions: Path, **chat):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", chat_rows(4))
    return make_config(tmp_path / "work", pivot, {"src": pivot}, [corpus],
                       eval={"chat": {"questions": str(questions), "engine": "hf", "num_cpus": 0.5,
                                      "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 6}, **chat}})


# --- the question file (no Ray) ---------------------------------------------------------------


def test_mt_bench_rows_read_as_is(tmp_path):
    rows = [*QUESTIONS, {"question_id": "ah-1", "category": "arena-hard-v0.1", "cluster": "x",
                         "turns": [{"content": "Arena-Hard style turn"}]}]
    path = write_jsonl(tmp_path / "question.jsonl", [*rows[:2], "", *rows[2:]])  # a blank line is skipped
    qs = read_questions(str(path), max_turns=2)
    assert [q["question_id"] for q in qs] == ["81", "111", "solo", "ah-1"]
    assert qs[0] == {"question_id": "81", "category": "writing", "turns": QUESTIONS[0]["turns"], "reference": None}
    assert qs[1]["reference"] == ["5", "20"]
    assert qs[3]["turns"] == ["Arena-Hard style turn"]
    assert [q["question_id"] for q in read_questions(str(path), max_questions=2)] == ["81", "111"]


@pytest.mark.parametrize(("line", "field"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"category": "x", "turns": ["q"]}', "'question_id'"),
    ('{"question_id": true, "turns": ["q"]}', "'question_id'"),
    ('{"question_id": 7, "category": 3, "turns": ["q"]}', "'category'"),
    ('{"question_id": 7, "turns": []}', "'turns'"),
    ('{"question_id": 7, "turns": ["a", "b", "c"]}', "over eval.chat.max_turns (2)"),
    ('{"question_id": 7, "turns": ["a", 5]}', "'turns[1]'"),
    ('{"question_id": 7, "turns": ["' + "x" * 101 + '"]}', "'turns[0]' has 101 characters"),
    ('{"question_id": 7, "turns": ["a"], "reference": ["r1", "r2"]}', "'reference'"),
    ('{"question_id": 81, "turns": ["again"]}', "question_id '81' repeats line 1"),
])
def test_a_bad_row_is_an_error_naming_the_file_the_line_and_the_field(tmp_path, line, field):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + line + "\n")
    with pytest.raises(QuestionFileError) as err:
        parse_questions(str(path), max_turns=2, max_turn_chars=100)
    assert f"question file {path}, line 2" in str(err.value)
    assert field in str(err.value)


def test_file_bounds_are_checked_before_reading(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", QUESTIONS * 50)
    with pytest.raises(QuestionFileError, match=r"over the limit of 1,000 .*is it a question file"):
        parse_questions(str(big), max_bytes=1000)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(QuestionFileError, match="no questions"):
        parse_questions(str(empty))
    with pytest.raises(QuestionFileError, match="cannot be read"):
        parse_questions(str(tmp_path / "missing.jsonl"))


# --- turn by turn on one engine (no Ray): a prompt without room is recorded ----------------------


def test_a_prompt_without_room_to_answer_is_recorded_not_raised(tiny_models):
    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.engines.sampling import HFSampler, SampleSettings
    from fusion_ray.evaluate.answers import PROMPT_TOO_LONG, answer_turns

    model = tiny_models("qwen2", "gpt2")
    tok = tokenizers.from_dir(model)
    qs = [{"question_id": "short", "turns": ["Hi", "Yo"]}, {"question_id": "long", "turns": ["word " * 40]}]
    first = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"]
    context = len(first) + 4  # room for 4 tokens after the short first turn, none after the long one
    out = answer_turns(HFSampler(str(model), tok), tok, context, SampleSettings(n=1, temperature=0.0, max_tokens=8),
                       "pivot", qs)
    assert out[0]["finish_reasons"][0] == "length" and out[0]["tokens"][0] == 4
    assert out[0]["finish_reasons"][1] == PROMPT_TOO_LONG  # turn 2 carries turn 1's answer: over the context
    assert out[1] == {"arm": "pivot", "question_id": "long", "answers": [""], "tokens": [0],
                      "finish_reasons": [PROMPT_TOO_LONG]}


# --- an endpoint arm against a stand-in server (no Ray) -----------------------------------------


class _StandIn(BaseHTTPRequestHandler):
    """A deterministic OpenAI-compatible chat endpoint: answers with the number of messages and
    the last one's first word; records each request's body and Authorization header."""

    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        last = body["messages"][-1]["content"]
        text = f"answer {len(body['messages'])} to {last.split()[0]}"
        reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    _StandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _StandIn.seen
    server.shutdown()
    server.server_close()


def test_an_endpoint_arm_sends_its_own_first_answer_with_the_second_turn(tmp_path, tiny_models, stand_in,
                                                                         monkeypatch):
    from fusion_ray.evaluate.answers import generate_answers, read_record

    url, seen = stand_in
    monkeypatch.setenv("CHAT_TEST_KEY", "sk-from-env")
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    cfg = _config(tmp_path, tiny_models("qwen2", "gpt2"), questions, concurrency=2,
                  endpoints={"served": {"url": url, "model": "tiny", "api_key_env": "CHAT_TEST_KEY"}})
    out = generate_answers(cfg, {}, log=lambda _: None)
    by_id = {a["question_id"]: a for a in out["served"]}
    assert by_id["81"]["answers"] == ["answer 1 to Write", "answer 3 to Now"]
    assert by_id["solo"] == {"arm": "served", "question_id": "solo", "answers": ["answer 1 to Say"], "tokens": [3],
                             "finish_reasons": ["stop"]}
    assert len(seen) == 5 and {s[0] for s in seen} == {"/v1/chat/completions"}
    assert {s[1] for s in seen} == {"Bearer sk-from-env"}
    second = next(body for _, _, body in seen if body["messages"][-1]["content"] == "Now make it rhyme.")
    assert second["messages"] == [{"role": "user", "content": "Write a haiku about rivers."},
                                  {"role": "assistant", "content": "answer 1 to Write"},
                                  {"role": "user", "content": "Now make it rhyme."}]
    assert second["model"] == "tiny" and second["max_tokens"] == 6 and second["temperature"] == 0.0
    record = read_record(next(iter((tmp_path / "work" / "chat" / "answers").glob("served-*.parquet"))).as_posix())
    assert record["endpoint"] == url and record["sampling"]["max_tokens"] == 6
    assert "sk-from-env" not in json.dumps(record)

    generate_answers(cfg, {}, log=lambda _: None)  # reused: no new requests
    assert len(seen) == 5


def test_an_endpoint_without_its_key_or_server_fails_naming_it(tmp_path, tiny_models, monkeypatch):
    import socket

    from fusion_ray.evaluate.answers import generate_answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://127.0.0.1:{port}/v1"
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    cfg = _config(tmp_path, tiny_models("qwen2", "gpt2"), questions,
                  endpoints={"down": {"url": url, "model": "m", "api_key_env": "CHAT_TEST_MISSING"}})
    monkeypatch.delenv("CHAT_TEST_MISSING", raising=False)
    with pytest.raises(ValueError, match="eval.chat.endpoints.down: the environment variable CHAT_TEST_MISSING"):
        generate_answers(cfg, {}, log=lambda _: None)
    monkeypatch.setenv("CHAT_TEST_MISSING", "k")
    with pytest.raises(RuntimeError, match=rf"eval.chat.endpoints.down: cannot reach {url}"):
        generate_answers(cfg, {}, log=lambda _: None)


# --- two model arms on Ray Data (hf engine) -------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_arms_answer_every_turn_on_ray_and_a_rerun_reuses(tmp_path, tiny_models, ray_local):
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.evaluate.answers import generate_answers, read_answers, read_record

    arms = {"pivot": str(tiny_models("qwen2", "gpt2")), "fused:a+b": str(tiny_models("mistral", "deepseek"))}
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    cfg = _config(tmp_path, Path(arms["pivot"]), questions, batch_size=2)  # 2 batches, one actor per arm
    logs: list[str] = []
    out = generate_answers(cfg, arms, log=logs.append)
    assert set(out) == set(arms)
    for arm, rows in out.items():
        assert [r["question_id"] for r in rows] == ["81", "111", "solo"]
        assert [len(r["answers"]) for r in rows] == [2, 2, 1]
        assert all(r["arm"] == arm and len(r["tokens"]) == len(r["finish_reasons"]) == len(r["answers"])
                   for r in rows)
        assert all(0 < t <= 6 for r in rows for t in r["tokens"])

    # turn 2 of question 111 for the llama arm: greedy generate on [q1, its own answer 1, q2]
    arm, path = "fused:a+b", arms["fused:a+b"]
    tok = tokenizers.from_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    mine = next(r for r in out[arm] if r["question_id"] == "111")
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": mine["answers"][0]},
                {"role": "user", "content": "And times 4?"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    expected = gen[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in expected:
        expected = expected[:expected.index(tok.eos_token_id)]
    assert mine["answers"][1] == tok.decode(expected, skip_special_tokens=True)

    files = sorted((tmp_path / "work" / "chat" / "answers").glob("*"))
    assert len(files) == 4  # per arm: answers and record
    assert {f.name.split("-")[0] for f in files} == {"pivot", "fused_a_b"}
    parquet = next(f for f in files if f.name.startswith("fused_a_b") and f.suffix == ".parquet")
    record = read_record(str(parquet))
    assert record["chat_template"] == tok.chat_template
    assert record["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert record["engine"] == "hf" and record["sampling"]["temperature"] == 0.0
    assert read_answers(str(parquet)) == out[arm]

    stamps = {f: f.stat().st_mtime_ns for f in files}
    logs.clear()
    again = generate_answers(cfg, arms, log=logs.append)
    assert again == out
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert sum("reused" in line for line in logs) == 2
