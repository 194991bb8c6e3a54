"""Benchmark the chat judge's call rate: judge calls per second at the configured concurrency.

The judge is the deterministic stand-in of tests/judge_server.py on loopback, holding every call
for a fixed service time (50 ms by default) to model a remote judge's latency; the client is
fusion_ray.evaluate.judging.judge_answers with the default JudgeConfig (its url and model aside):
single-answer grading of one arm's answers to synthetic two-turn questions, into a fresh judgement
store. The same run at concurrency 1 is the baseline, side by side. Then the run is repeated on
the filled store: re-scoring makes no calls (its time is reported).

Usage: python bench/eval_judge.py [--quick] [--questions N] [--service-ms MS]
The last line is one JSON object: {"judge_calls_per_s", "judge_calls_per_s_concurrency_1",
"judge_concurrency", "judge_concurrency_speedup", "judge_calls", "judge_service_ms", "judge_rescore_s"}.
bench/eval.py imports `judge_case`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the stand-in judge lives with the tests

from judge_server import JudgeServer  # noqa: E402

from fusion_ray.config import JudgeConfig  # noqa: E402
from fusion_ray.evaluate.judging import judge_answers  # noqa: E402


def synthetic(n: int) -> tuple[list[dict], dict[str, list[dict]]]:
    questions = [{"question_id": f"q{i}", "category": ["writing", "math", "coding", "roleplay"][i % 4],
                  "turns": [f"Question {i}, first turn: explain topic {i}.", f"Question {i}: now go deeper."],
                  "reference": [f"ref {i} a", f"ref {i} b"]} for i in range(n)]
    rows = [{"arm": "merged", "question_id": f"q{i}",
             "answers": ["An answer " + "word " * (i % 17), "A follow-up " + "more " * (i % 11)],
             "tokens": [0, 0], "finish_reasons": ["stop", "stop"]} for i in range(n)]
    return questions, {"merged": rows}


def run_once(concurrency: int | None, questions, answers, service_s: float, log) -> dict:
    store = tempfile.mkdtemp(prefix="fr_bench_judge_")
    try:
        with JudgeServer(service_delay_s=service_s) as server:
            kw = {"url": server.url, "model": "bench-judge"}
            if concurrency is not None:
                kw["concurrency"] = concurrency
            cfg = JudgeConfig(**kw)
            t0 = time.perf_counter()
            res = judge_answers(cfg, questions, answers, store, log=lambda *_: None)
            took = time.perf_counter() - t0
            t1 = time.perf_counter()
            again = judge_answers(cfg, questions, answers, store, log=lambda *_: None)
            rescore = time.perf_counter() - t1
        assert res["failed"] == 0 and res["over_budget"] == 0, res
        assert again["calls"] == 0 and again["arms"] == res["arms"]
        out = {"concurrency": cfg.concurrency, "calls": res["calls"], "seconds": took,
               "calls_per_s": res["calls"] / took, "max_in_flight": server.max_in_flight, "rescore_s": rescore}
        log(f"concurrency {cfg.concurrency:>3}: {res['calls']} calls in {took:.2f}s = {out['calls_per_s']:.1f} calls/s "
            f"(server saw {server.max_in_flight} in flight); re-score from the store {rescore:.2f}s, 0 calls")
        return out
    finally:
        shutil.rmtree(store, ignore_errors=True)


def judge_case(quick: bool = False, questions: int | None = None, service_ms: float = 50.0, log=print) -> dict:
    n = questions or (24 if quick else 80)
    qs, answers = synthetic(n)
    log(f"judge: {n} two-turn questions, 1 arm, single grading, {service_ms:.0f} ms per call at the stand-in")
    default = run_once(None, qs, answers, service_ms / 1000, log)
    one = run_once(1, qs, answers, service_ms / 1000, log)
    return {"judge_calls_per_s": default["calls_per_s"], "judge_calls_per_s_concurrency_1": one["calls_per_s"],
            "judge_concurrency": default["concurrency"],
            "judge_concurrency_speedup": default["calls_per_s"] / one["calls_per_s"],
            "judge_calls": default["calls"], "judge_service_ms": service_ms, "judge_rescore_s": default["rescore_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--service-ms", type=float, default=50.0)
    args = ap.parse_args()
    res = judge_case(quick=args.quick, questions=args.questions, service_ms=args.service_ms)
    print(f"judge calls/s at concurrency {res['judge_concurrency']}: {res['judge_calls_per_s']:.1f} "
          f"({res['judge_concurrency_speedup']:.2f}x concurrency 1's {res['judge_calls_per_s_concurrency_1']:.1f})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
