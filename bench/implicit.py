"""Implicit fusion (FuseChat-3.0) on the embedded default, over seeds: what each arm learns, what
DPO adds over SFT, what fusing the sources adds over the best of them alone, and the throughput
of the sampling engines and the reward stage.

Steps:
  1. per seed: the whole method (sample → reward → pairs → sft → dpo → eval) through
     `pipeline.run_stages` on the config (default `jobs/configs/fusechat3_tiny.yaml`), with
     `implicit.seed`, `implicit.pairs.seed` and `train.seed` set to the seed, in its own workdir;
     the report's accuracy over every verifiable held-out prompt, per arm;
  2. sampling throughput: the `sample` stage's own engine actor class (`SampleUDF`) for the first
     source, once with `implicit.engine: vllm`, once with `hf`, on the same prompt rows, timed
     after a warm-up batch; generated tokens per second;
  3. reward throughput: rows per second of each seed's `reward` stage (its manifest's rows and
     wall time: the verifiers, the sandbox and the reward model together).

Usage: python bench/implicit.py [--config jobs/configs/fusechat3_tiny.yaml] [--seeds 3]
       [--out runs/bench_implicit] [--throughput-prompts 64]
The last line is one JSON object: `accuracy` per arm (mean, std), `dpo_vs_sft_gain`,
`fused_vs_best_single_gain` (each mean, std over seeds), `vllm_vs_hf_sample_throughput`,
`reward_rows_per_s`.
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


def run_seed(config: str, seed: int, out: Path, log=print) -> dict:
    """The method end to end for one seed; the report and the reward stage's rate."""
    from fusion_ray.pipeline import run_stages

    cfg = load_config(config, [f"workdir={out / f'seed{seed}'}", f"implicit.seed={seed}",
                               f"implicit.pairs.seed={seed}", f"train.seed={seed}"])
    started = time.monotonic()
    run_stages(cfg, [s for s in cfg.stages() if s != "serve"], log=log)
    report = json.loads(io.read_text(f"{cfg.stage_dir('eval')}/report.json"))
    reward = io.read_manifest(cfg.stage_dir("reward"))
    return {"seed": seed, "wall_s": round(time.monotonic() - started, 1), "accuracy": report["accuracy_all"],
            "accuracy_per_domain": report["accuracy"], "best_single": report["best_single"],
            "reward_rows": reward["rows"]["out"], "reward_wall_s": reward["wall_time_s"]}


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


def summarize(runs: list[dict]) -> dict:
    arms = sorted({a for r in runs for a in r["accuracy"]})
    accuracy = {a: mean_std([r["accuracy"][a] for r in runs if a in r["accuracy"]]) for a in arms}
    gains = {"dpo_vs_sft_gain": [r["accuracy"]["dpo"] - r["accuracy"]["sft"] for r in runs
                                 if {"dpo", "sft"} <= set(r["accuracy"])],
             "fused_vs_best_single_gain": [r["accuracy"]["dpo"] - r["accuracy"][r["best_single"]] for r in runs
                                           if r["best_single"] and "dpo" in r["accuracy"]]}
    return {"accuracy": accuracy, **{k: mean_std(v) if v else None for k, v in gains.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/bench_implicit")
    p.add_argument("--throughput-prompts", type=int, default=64)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        run = run_seed(args.config, seed, out)
        runs.append(run)
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(run) + "\n")
        print(f"[seed {seed}] {run['wall_s']}s  " + "  ".join(f"{a} {v:.1%}" for a, v in run["accuracy"].items()))
    summary = summarize(runs)
    for arm, s in summary["accuracy"].items():
        print(f"accuracy {arm:<16} {s['mean']:.1%} ± {s['std']:.1%}")
    throughput = sample_throughput(args.config, args.throughput_prompts)
    rates = [r["reward_rows"] / r["reward_wall_s"] for r in runs if r["reward_wall_s"]]
    result = {**summary,
              "vllm_vs_hf_sample_throughput": round(throughput["vllm"]["tokens_per_s"]
                                                    / throughput["hf"]["tokens_per_s"], 2),
              "sample_tokens_per_s": {k: v["tokens_per_s"] for k, v in throughput.items()},
              "reward_rows_per_s": round(statistics.fmean(rates), 2) if rates else None,
              "seeds": args.seeds, "wall_s": [r["wall_s"] for r in runs]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
