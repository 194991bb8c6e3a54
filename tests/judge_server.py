"""A deterministic stand-in for an LLM judge: an OpenAI-compatible /v1/chat/completions on loopback.

Importable from tests and benches (`from judge_server import JudgeServer`); stdlib only. Its verdicts
are derived from the prompt, so a test can compute the expected numbers from the answers alone:

- a grading prompt (fusion_ray.evaluate.judging's single mode: one conversation, the graded answer
  after the last "### Assistant:") gets "Rating: [[r]]" with r = min(10, 1 + len(answer) // 10);
  an answer containing NORATING gets a reply without a rating;
- a comparison prompt (two conversations, "### Assistant A:" / "### Assistant B:") gets [[A]] when A's
  last answer is longer, [[B]] when B's is, [[C]] when equally long; `position_bias="A"` (or "B")
  makes it answer that position whatever the answers (the swap rule must turn this into ties).

Fault injection: `fail_first=k` answers the first k calls of each distinct prompt with
`fail_status` (500 by default; 429 works too); `fail_match` answers every call whose prompt contains
that text with `fail_status`; `delay_first=k` holds the first k calls of each prompt for `delay_s`
(past the client's timeout) before answering; `service_delay_s` holds every call that long (a
remote judge's latency). Records: `calls` (one dict per request: the prompt, the model, the
Authorization header, the status answered), `max_in_flight` (most requests handled at once).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LAST_ANSWER = re.compile(r"### Assistant:\n(.*?)(?=\n\n### User:|\n\[The End of the Conversation\])", re.S)
LAST_A = re.compile(r"### Assistant A:\n(.*?)(?=\n\n### User:|\n\[The End of Assistant A's Conversation\])", re.S)
LAST_B = re.compile(r"### Assistant B:\n(.*?)(?=\n\n### User:|\n\[The End of Assistant B's Conversation\])", re.S)


def rating_for(answer: str) -> int:
    """The stand-in's grade of an answer (tests compute expectations with this, from the answers)."""
    return min(10, 1 + len(answer) // 10)


def verdict_for(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"


class JudgeServer:
    def __init__(self, *, fail_first: int = 0, fail_status: int = 500, fail_match: str | None = None,
                 delay_first: int = 0, delay_s: float = 0.0, service_delay_s: float = 0.0,
                 position_bias: str | None = None):
        self.fail_first, self.fail_status, self.fail_match = fail_first, fail_status, fail_match
        self.delay_first, self.delay_s, self.service_delay_s = delay_first, delay_s, service_delay_s
        self.position_bias = position_bias
        self.calls: list[dict] = []
        self.seen: Counter = Counter()  # prompt -> calls so far
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ verdicts

    def reply(self, prompt: str) -> str:
        if "### Assistant A:" in prompt:
            if self.position_bias:
                return f"Position {self.position_bias} reads better. [[{self.position_bias}]]"
            a, b = LAST_A.findall(prompt), LAST_B.findall(prompt)
            return f"Comparing the two. [[{verdict_for(a[-1], b[-1])}]]"
        answers = LAST_ANSWER.findall(prompt)
        if not answers:
            return "I see no answer to grade."
        if "NORATING" in answers[-1]:
            return "I will not give a number for this one."
        return f"A fair answer. Rating: [[{rating_for(answers[-1])}]]"

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self.httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> JudgeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.seen[prompt] += 1
                    nth = server.seen[prompt]
                try:
                    if server.service_delay_s:
                        time.sleep(server.service_delay_s)
                    if nth <= server.delay_first:
                        time.sleep(server.delay_s)
                    failing = nth <= server.fail_first or (server.fail_match is not None
                                                            and server.fail_match in prompt)
                    status = server.fail_status if failing else 200
                    with server.lock:
                        server.calls.append({"prompt": prompt, "model": body.get("model"), "status": status,
                                             "auth": self.headers.get("Authorization"),
                                             "temperature": body.get("temperature"),
                                             "max_tokens": body.get("max_tokens")})
                    if failing:
                        payload = {"error": {"message": "injected failure", "type": "server_error"}}
                    else:
                        payload = {"id": f"judge-{nth}", "object": "chat.completion", "created": int(time.time()),
                                   "model": body.get("model"), "choices": [{
                                       "index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": server.reply(prompt)}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def ok_calls(self) -> list[dict]:
        return [c for c in self.calls if c["status"] == 200]
