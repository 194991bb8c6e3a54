"""Fair routing across tokenizers: MinCE with the candidates compared per token (`fuse.metric: ce`)
against per byte of the same text (`bpb`), measured with the shipped pipeline on the demo.

The demo's three models tokenize differently (the pivot a cut DeepSeek tokenizer, the sources a
cut GPT-2 and a cut Mistral one), so a candidate's mean NLL per token is taken over a different
number of tokens for each: a finer tokenizer looks better per token on the same text. Per byte,
every candidate is scored on the same unit.

Steps:
  1. the demo's pipeline to `align` (local Ray, the demo config), then `fuse` once per metric,
     each exported as a training bundle (`bench/quality.py`'s `export_bundle`);
  2. bytes per scored token of each model, per domain (from `collect`'s rows), and each metric's
     routing: the share of a domain's samples on which the source won over the pivot;
  3. the sweep of `bench/quality.py` (the train stage's batches, loss and optimizer, one process
     per arm) on each bundle, at the demo's training settings, for each seed: CLM-only and each
     pairwise fused target; Δ bpb = fused − CLM-only on the fused source's domain.

Usage: python bench/routing.py [--out runs/routing] [--seeds 3] [--workers 2] [--metrics ce,bpb] [--steps N]
The last line is one JSON object: `delta_bpb` ({metric: {domain: {mean, std}}}), `routing_share`
({metric: {pair: {domain: share}}}), `bytes_per_token` ({model: {domain: bytes}}), `seeds`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: bundles and the training sweep)


def bytes_per_token(cfg) -> dict[str, dict[str, float]]:
    """model → domain → UTF-8 bytes per scored token of its own tokenization (collect's rows)."""
    import numpy as np

    from fusion_ray import io

    domains = {}
    for f in io.list_files(cfg.stage_dir("prepare")):
        t = io.read_table(f, columns=["sample_id", "domain"])
        domains.update(zip(t.column("sample_id").to_pylist(), t.column("domain").to_pylist(), strict=True))
    out = {}
    for model in [cfg.pivot, *cfg.sources]:
        n_bytes: dict[str, int] = {}
        n_tokens: dict[str, int] = {}
        for f in io.list_files(cfg.stage_dir("collect", model.name)):
            t = io.read_table(f, columns=["sample_id", "n_bytes", "loss_mask"])
            for sid, nb, mask in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
                d = domains[sid]
                n_bytes[d] = n_bytes.get(d, 0) + nb
                n_tokens[d] = n_tokens.get(d, 0) + int(np.sum(mask))
        out[model.name] = {d: round(n_bytes[d] / max(n_tokens[d], 1), 3) for d in sorted(n_bytes)}
    return out


def routing_share(cfg) -> dict[str, dict[str, float]]:
    """pair → domain → share of the domain's samples on which the pair's source won (fuse's manifest)."""
    from fusion_ray import io

    out = {}
    for _, pair in cfg.source_pairs():
        stats = io.read_manifest(cfg.stage_dir("fuse", pair))["extra"]["routing"]
        out[pair] = {d: round(1 - s["wins"].get("pivot", 0) / max(sum(s["wins"].values()), 1), 4)
                     for d, s in stats.items()}
    return out


def build(out: str, metrics: list[str], log=print) -> tuple[dict, dict, dict]:
    """Step 1 and 2: one bundle per metric; the routing of each, and the models' bytes per token."""
    from fusion_ray.config import load_config
    from fusion_ray.demo.assets import default_demo_config
    from fusion_ray.pipeline import run_stages

    base = [f"workdir={out}/pipeline"]
    cfg = load_config(default_demo_config(), base)
    run_stages(cfg, ["prepare", "collect", "align"], log=log)
    bundles, shares = {}, {}
    for metric in metrics:
        cfg = load_config(default_demo_config(), [*base, f"fuse.metric={metric}"])
        run_stages(cfg, ["fuse"], log=log)
        shares[metric] = routing_share(cfg)
        bundles[metric] = f"{out}/bundle_{metric}"
        quality.export_bundle(cfg, bundles[metric])
    return bundles, shares, bytes_per_token(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/routing")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="arms trained in parallel processes")
    p.add_argument("--metrics", default="ce,bpb")
    p.add_argument("--steps", type=int, help="training steps per arm (default: the demo config's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from fusion_ray.config import load_config
    from fusion_ray.demo.assets import default_demo_config

    started = time.monotonic()
    metrics = args.metrics.split(",")
    bundles, shares, granularity = build(args.out, metrics)
    for model, per in granularity.items():
        print(f"{model:<12} bytes per token: " + "  ".join(f"{d} {v:.2f}" for d, v in per.items()))
    t = load_config(default_demo_config()).train
    grid = [dict(lam=t.lambda_clm, positions=t.fusion_positions, tail=t.tail, temperature=t.temperature)]
    key = quality.setting_key(grid[0])
    delta = {}
    for metric in metrics:
        for pair, per in shares[metric].items():
            print(f"{metric:<4} {pair:<10} source won " + "  ".join(f"{d} {v:.1%}" for d, v in per.items()))
        results = quality.sweep(bundles[metric], f"{args.out}/sweep_{metric}", list(range(args.seeds)), grid,
                                args.device, args.steps, args.workers)
        per_domain = quality.deltas(results, Path(bundles[metric]).name)[key]
        delta[metric] = {d: quality.mean_std(v) for d, v in sorted(per_domain.items())}
        print(f"{metric:<4} Δbpb vs CLM-only on the source's domain: "
              + "  ".join(f"{d} {s['mean']:+.4f}±{s['std']:.4f}" for d, s in delta[metric].items()))
    print(f"{time.monotonic() - started:.0f}s")
    print(json.dumps({"delta_bpb": delta, "routing_share": shares, "bytes_per_token": granularity,
                      "seeds": args.seeds, "setting": key}))


if __name__ == "__main__":
    main()
