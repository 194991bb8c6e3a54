"""The preference stage's levers on the implicit default, chosen on validation prompts only.

FuseChat-3.0's levers after SFT: how pairs are built, the DPO loss and its β, an NLL term on the
chosen responses, and the SFT:DPO split. This bench tries settings of them and says which one it
would ship, by a rule fixed before any run and measured on the build's own validation prompts:
never on the held-out prompts, never by the independent judge (`demo:judge_tiny`), so that the
held-out, judged figures of bench/implicit.py stay an honest test of the choice.

Steps:
  1. validation prompts: part of the training prompts, split off once (by a hash of the row id):
     for `--arith-share` of `demo:arith_train`'s facts, one of the fact's training phrasings (its
     other phrasings still train, as the held-out prompts' facts are trained in other words), and
     `--open-count` of `demo:open_train`. The rest trains.
  2. per seed and setting: the method through `pipeline.run_stages` with the training prompts as
     `implicit.prompts`, the validation prompts as `implicit.heldout`, no single-source arms and no
     chat judge, in one workdir per seed (settings that change only DPO reuse sample → sft);
  3. per setting, over seeds: the SFT+DPO arm against the SFT arm of the same run, on validation
     prompts: verified accuracy gained, and the win rate by the pair-choosing reward model (the
     method's own signal; ties half) on the open ones.
  4. the rule: among settings whose mean accuracy gain is at least −1 standard error (over seeds)
     of the shipped setting's SFT accuracy, the highest reward-model win rate; the shipped setting
     when none beats it.

Usage: python bench/implicit_levers.py [--seeds 3] [--out runs/bench_levers] [--settings a,b,…]
The last line is one JSON object: per setting `val_accuracy_gain` and `val_rm_win_rate` (mean,
std over seeds), `sft_val_accuracy`, and `chosen`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_ray import io  # noqa: E402
from fusion_ray.config import load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fusechat3_tiny.yaml"
# name → overrides; the shipped config's own settings are "shipped". DPO-only settings come first
# (they reuse a seed's sample, reward, pairs and sft stages).
SETTINGS: dict[str, list[str]] = {
    "shipped": [],
    "beta_0.01": ["implicit.dpo.beta=0.01"],  # FuseChat-3.0's β for its Qwen-2.5 and Gemma-2 targets
    "beta_0.5": ["implicit.dpo.beta=0.5"],
    "no_nll": ["implicit.dpo.nll_weight=0.0"],
    "length_normalized": ["implicit.dpo.loss=length_normalized", "implicit.dpo.beta=1.0"],
    "simpo": ["implicit.dpo.loss=simpo", "implicit.dpo.beta=2.0"],
    "gap_0.5": ["implicit.pairs.min_gap=0.5"],
    "per_prompt_all": ["implicit.pairs.per_prompt=all"],  # a pair per source: up to 3 times the pairs
    "dpo_fraction_0.3": ["implicit.pairs.dpo_fraction=0.3"],
}


def mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def in_validation(row_id: str, share: float) -> bool:
    return int(hashlib.sha256(f"val:{row_id}".encode()).hexdigest()[:8], 16) / 16**8 < share


def split_prompts(out: Path, arith_share: float, open_count: int) -> dict[str, Path]:
    """Training and validation prompt files below `out` (written once)."""
    from fusion_ray.demo import builds, implicit

    builds.ensure_implicit()
    rows = {name: [json.loads(x) for x in open(implicit.asset_path(name))] for name in ("arith_train", "open_train")}
    fact = {r["id"]: r["id"].rsplit("-t", 1)[0] for r in rows["arith_train"]}  # add-2-13-t1 → add-2-13
    phrasings: dict[str, list[dict]] = {}
    for r in rows["arith_train"]:
        phrasings.setdefault(fact[r["id"]], []).append(r)
    val_arith = [min(rs, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
                 for f, rs in sorted(phrasings.items()) if in_validation(f, arith_share) and len(rs) > 1]
    open_sorted = sorted(rows["open_train"], key=lambda r: hashlib.sha256(f"val:{r['id']}".encode()).hexdigest())
    val_open = open_sorted[:open_count]
    files = {"arith_fit": [r for r in rows["arith_train"] if r not in val_arith], "arith_val": val_arith,
             "open_fit": [r for r in rows["open_train"] if r not in val_open], "open_val": val_open}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rs in files.items():
        paths[name] = out / f"{name}.jsonl"
        io.write_bytes_atomic(str(paths[name]), "".join(json.dumps(r) + "\n" for r in rs).encode())
    print(f"[levers] validation: {len(val_arith)} arith prompts ({len({fact[r['id']] for r in val_arith})} facts), "
          f"{len(val_open)} open; training: {len(files['arith_fit'])} arith, {len(files['open_fit'])} open")
    return paths


def rm_win_rate(cfg, arm: str, base: str) -> float:
    """Share of validation open prompts where the reward model scores `arm`'s answer above `base`'s."""
    import pyarrow as pa

    rows = pa.concat_tables([io.read_table(f) for f in io.list_files(f"{cfg.workdir}/_eval/rewards")]).to_pylist()
    by = {(r["source"], r["prompt_id"]): r["reward"] for r in rows if not r["verifiable"]}
    prompts = sorted({p for _, p in by})
    score = sum(1.0 if by.get((arm, p), 0) > by.get((base, p), 0) else
                0.5 if by.get((arm, p), 0) == by.get((base, p), 0) else 0.0 for p in prompts)
    return score / max(len(prompts), 1)


def run(config: str, seed: int, setting: str, paths: dict, out: Path) -> dict:
    from fusion_ray.pipeline import run_stages

    overrides = [f"workdir={out / f'seed{seed}'}", f"implicit.seed={seed}", f"implicit.pairs.seed={seed}",
                 f"train.seed={seed}", "implicit.single_source_arms=[]", "eval.chat=null",
                 f"implicit.prompts.0.path={paths['arith_fit']}", f"implicit.prompts.1.path={paths['open_fit']}",
                 f"implicit.heldout.0.path={paths['arith_val']}", f"implicit.heldout.1.path={paths['open_val']}",
                 *SETTINGS[setting]]
    cfg = load_config(config, overrides)
    started = time.monotonic()
    run_stages(cfg, [s for s in cfg.stages() if s != "serve"], log=lambda line: None)
    report = json.loads(io.read_text(f"{cfg.stage_dir('eval')}/report.json"))
    acc = report["accuracy_all"]
    return {"seed": seed, "setting": setting, "wall_s": round(time.monotonic() - started, 1),
            "sft_accuracy": acc["sft"], "dpo_accuracy": acc["dpo"], "accuracy_gain": acc["dpo"] - acc["sft"],
            "rm_win_rate": rm_win_rate(cfg, "dpo", "sft")}


def choose(summary: dict) -> str:
    """The rule of step 4 (fixed before any run)."""
    sft = summary["shipped"]["sft_val_accuracy"]
    floor = -sft["std"] / sft["n"] ** 0.5
    win = {s: v["val_rm_win_rate"]["mean"] for s, v in summary.items() if v["val_accuracy_gain"]["mean"] >= floor}
    best = max(win, key=win.get, default="shipped")
    return best if win.get(best, 0) > summary["shipped"]["val_rm_win_rate"]["mean"] else "shipped"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/bench_levers")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--arith-share", type=float, default=0.3)
    p.add_argument("--open-count", type=int, default=40)
    args = p.parse_args()
    out = Path(args.out).resolve()
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or "shipped" not in settings:
        raise SystemExit(f"--settings: unknown {unknown} (known: {', '.join(SETTINGS)}); 'shipped' is required")
    paths = split_prompts(out / "prompts", args.arith_share, args.open_count)
    runs: list[dict] = []
    for seed in range(args.seeds):
        for setting in settings:
            r = run(args.config, seed, setting, paths, out)
            runs.append(r)
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[seed {seed}] {setting:<18} SFT {r['sft_accuracy']:.1%}  SFT+DPO {r['dpo_accuracy']:.1%}  "
                  f"reward-model win rate vs SFT {r['rm_win_rate']:.1%}  ({r['wall_s']}s)", flush=True)
    summary = {}
    for setting in settings:
        mine = [r for r in runs if r["setting"] == setting]
        summary[setting] = {"val_accuracy_gain": mean_std([r["accuracy_gain"] for r in mine]),
                            "val_rm_win_rate": mean_std([r["rm_win_rate"] for r in mine]),
                            "sft_val_accuracy": mean_std([r["sft_accuracy"] for r in mine])}
        s = summary[setting]
        print(f"{setting:<18} accuracy gain {s['val_accuracy_gain']['mean']:+.1%} ± {s['val_accuracy_gain']['std']:.1%}"
              f"  reward-model win rate vs SFT {s['val_rm_win_rate']['mean']:.1%} ± {s['val_rm_win_rate']['std']:.1%}")
    chosen = choose(summary)
    print(f"chosen by the rule: {chosen}")
    print(json.dumps({"settings": summary, "chosen": chosen, "overrides": SETTINGS[chosen], "seeds": args.seeds}))


if __name__ == "__main__":
    main()
