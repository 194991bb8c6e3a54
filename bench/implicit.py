"""Implicit fusion (FuseChat-3.0) on the embedded default, over seeds: what each arm learns, what
DPO adds over SFT (on verified accuracy and by the independent judge), what fusing the sources
adds over the best of them alone, and the throughput of the sampling engines and the reward stage.

Steps:
  1. per seed: the whole method (sample → reward → pairs → sft → dpo → eval) through
     `pipeline.run_stages` on the config (default `jobs/configs/fusechat3_tiny.yaml`), with
     `implicit.seed`, `implicit.pairs.seed` and `train.seed` set to the seed, in its own workdir;
     the report's accuracy over every verifiable held-out prompt, per arm, and the chat judge's
     pairwise win rates (`eval.chat.judge`: each arm against the pivot and against SFT);
  2. sampling throughput: the `sample` stage's own engine actor class (`SampleUDF`) for the first
     source, once with `implicit.engine: vllm`, once with `hf`, on the same prompt rows, timed
     after a warm-up batch; generated tokens per second;
  3. reward throughput: rows per second of each seed's `reward` stage (its manifest's rows and
     wall time: the verifiers, the sandbox and the reward model together).

Usage: python bench/implicit.py [--config jobs/configs/fusechat3_tiny.yaml] [--seeds 3]
       [--out runs/bench_implicit] [--throughput-prompts 64] [--no-throughput] [--set KEY=VALUE ...]
The last line is one JSON object: `accuracy` per arm (mean, std), `dpo_vs_sft_accuracy_gain`,
`fused_vs_best_single_gain` (each mean, std over seeds), `dpo_vs_sft_win_rate` (the judge's, pooled
over seeds: each held-out question's preference averaged over the seeds, then bootstrapped over
questions for its 95 % interval), `win_rate` per arm and baseline (the same pooling, with the
length-controlled rate's mean over seeds), `vllm_vs_hf_sample_throughput`, `reward_rows_per_s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_ray import io  # noqa: E402
from fusion_ray.config import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fusechat3_tiny.yaml"


def mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def run_seed(config: str, seed: int, out: Path, log=print, overrides: list[str] = ()) -> dict:
    """The method end to end for one seed; the report and the reward stage's rate."""
    from fusion_ray.pipeline import run_stages

    cfg = load_config(config, [f"workdir={out / f'seed{seed}'}", f"implicit.seed={seed}",
                               f"implicit.pairs.seed={seed}", f"train.seed={seed}", *overrides])
    started = time.monotonic()
    run_stages(cfg, [s for s in cfg.stages() if s != "serve"], log=log)
    report = json.loads(io.read_text(f"{cfg.stage_dir('eval')}/report.json"))
    reward = io.read_manifest(cfg.stage_dir("reward"))
    judge = ((report.get("chat") or {}).get("judge") or {}).get("arms", {})
    pairwise = {arm: {b: {k: p[k] for k in ("win_rate", "ci", "lc_win_rate", "lc_ci", "per_question")}
                      for b, p in (res.get("pairwise") or {}).items()} for arm, res in judge.items()}
    return {"seed": seed, "wall_s": round(time.monotonic() - started, 1), "accuracy": report["accuracy_all"],
            "accuracy_per_domain": report["accuracy"], "best_single": report["best_single"],
            "pairwise": pairwise, "reward_rows": reward["rows"]["out"], "reward_wall_s": reward["wall_time_s"]}


def sample_throughput(config: str, n_prompts: int, log=print) -> dict:
    """Generated tokens/s of the sample stage's engine class, vLLM against transformers, same prompts."""
    import pyarrow as pa

    from fusion_ray.sample.prompts import read_prompts
    from fusion_ray.sample.stage import SampleUDF

    cfg = load_config(config)
    prompts = read_prompts(cfg.implicit.prompts, cfg.implicit.samples).slice(0, n_prompts)
    prompts = prompts.append_column("path", pa.array(["bench"] * prompts.num_rows, pa.string()))
    source = cfg.sources[0].name
    warm, timed = prompts.slice(0, min(8, prompts.num_rows)), prompts
    out = {}
    for engine in ("vllm", "hf"):
        sub = cfg.model_copy(update={"implicit": cfg.implicit.model_copy(update={"engine": engine})})
        udf = SampleUDF(sub.to_wire(), source)
        udf(warm)
        started = time.monotonic()
        rows = udf(timed)
        wall = time.monotonic() - started
        tokens = sum(rows.column("tokens").to_pylist())
        out[engine] = {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}
        log(f"[throughput] {source} {engine}: {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tokens/s "
            f"({timed.num_rows} prompts × {cfg.implicit.samples} samples)")
        close = getattr(udf.engine, "close", None)
        if close:
            close()
        del udf
    return out


def pooled_win_rate(results: list[dict], resamples: int = 2000) -> dict:
    """One arm's win rate against one baseline over runs: each question's preference averaged over
    the runs that judged it, the mean over questions, and a 95 % interval from resampling questions
    (a question's runs move together: they share the prompt)."""
    from fusion_ray.evaluate.chatstats import bootstrap_ci

    per_q: dict[str, list[float]] = {}
    for res in results:
        for q, v in res["per_question"].items():
            per_q.setdefault(q, []).append(v)
    boot = bootstrap_ci([statistics.fmean(v) for v in per_q.values()], resamples, 0)
    return {"win_rate": round(boot["mean"], 4), "ci": [round(x, 4) for x in boot["ci"]] if boot["ci"] else None,
            "lc_win_rate": mean_std([r["lc_win_rate"] for r in results]), "questions": len(per_q),
            "runs": len(results)}


def summarize(runs: list[dict]) -> dict:
    arms = sorted({a for r in runs for a in r["accuracy"]})
    accuracy = {a: mean_std([r["accuracy"][a] for r in runs if a in r["accuracy"]]) for a in arms}
    gains = {"dpo_vs_sft_accuracy_gain": [r["accuracy"]["dpo"] - r["accuracy"]["sft"] for r in runs
                                          if {"dpo", "sft"} <= set(r["accuracy"])],
             "fused_vs_best_single_gain": [r["accuracy"]["dpo"] - r["accuracy"][r["best_single"]] for r in runs
                                           if r["best_single"] and "dpo" in r["accuracy"]]}
    pairs = sorted({(a, b) for r in runs for a, by in r.get("pairwise", {}).items() for b in by})
    win_rate: dict[str, dict] = {}
    for a, b in pairs:
        win_rate.setdefault(a, {})[b] = pooled_win_rate([r["pairwise"][a][b] for r in runs
                                                         if b in r.get("pairwise", {}).get(a, {})])
    return {"accuracy": accuracy, **{k: mean_std(v) if v else None for k, v in gains.items()},
            "dpo_vs_sft_win_rate": win_rate.get("dpo", {}).get("sft"), "win_rate": win_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/bench_implicit")
    p.add_argument("--throughput-prompts", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every seed (e.g. a setting bench/implicit_levers.py chose)")
    p.add_argument("--no-throughput", action="store_true", help="skip step 2 (the engines' sampling rate)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        run = run_seed(args.config, seed, out, overrides=args.set)
        runs.append(run)
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(run) + "\n")
        print(f"[seed {seed}] {run['wall_s']}s  " + "  ".join(f"{a} {v:.1%}" for a, v in run["accuracy"].items()))
    summary = summarize(runs)
    for arm, s in summary["accuracy"].items():
        print(f"accuracy {arm:<16} {s['mean']:.1%} ± {s['std']:.1%}")
    for arm, by in summary["win_rate"].items():
        for base, w in by.items():
            lo, hi = w["ci"] or (float("nan"), float("nan"))
            print(f"judge    {arm:<16} vs {base:<6} win rate {w['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] over "
                  f"{w['questions']} questions × {w['runs']} seeds, LC {w['lc_win_rate']['mean']:.1%}")
    throughput = None if args.no_throughput else sample_throughput(args.config, args.throughput_prompts)
    rates = [r["reward_rows"] / r["reward_wall_s"] for r in runs if r["reward_wall_s"]]
    result = {**summary,
              "vllm_vs_hf_sample_throughput": round(throughput["vllm"]["tokens_per_s"]
                                                    / throughput["hf"]["tokens_per_s"], 2) if throughput else None,
              "sample_tokens_per_s": {k: v["tokens_per_s"] for k, v in throughput.items()} if throughput else None,
              "overrides": args.set,
              "reward_rows_per_s": round(statistics.fmean(rates), 2) if rates else None,
              "seeds": args.seeds, "wall_s": [r["wall_s"] for r in runs]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
