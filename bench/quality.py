"""Demo-scale quality: what fusion adds over CLM-only training, over seeds, and how much
of it survives the tokenizer alignment.

Steps:
  1. data: the demo's fused datasets (the real pipeline: prepare → collect → align → fuse
     on local Ray) for (a) the demo's sources, whose tokenizers differ from the pivot's,
     and (b) a control whose sources are the same architectures trained on the same mixes
     but with the pivot's tokenizer (so alignment is exact); exported to a `.pt` bundle;
  2. sweep: the pivot trained in one process per arm (the train stage's own batches, step,
     loss, optimizer, schedule, accumulation and clipping, called from fusion_ray.train; the
     demo's steps, batch sizes and lr) for each seed: CLM-only, and each pairwise fused
     target under each setting; held-out bits per byte per domain;
  3. summary: Δbpb = fused − CLM-only on the domain of the fused source, mean ± std over
     seeds, and transfer efficiency = Δ(different tokenizers) / Δ(shared tokenizer) (mean
     over domains), per setting; the best setting is the one whose least-gaining domain
     gains most. The averaged / SCE / VaRM merges of the pairwise targets are scored too.

Step 2 runs on CPU or, given `--device cuda`, on a GPU machine without Ray (it only needs
the bundle, torch and transformers): `python bench/quality.py --bundle B --out R`.

Usage: python bench/quality.py [--seeds 3] [--lambdas 0.7,0.9] [--positions transferred] [--workers 2]
       [--variants renormalize,label,exact]   (align.prefix of the main bundles; the first is `bundle_main`)
       [--pivot-tokenizer mistral]   (a SentencePiece pivot: a twin of the demo pivot with that tokenizer)
The last line is one JSON object with `delta_bpb` (per domain: mean, std) and
`transfer_efficiency`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_ray.evaluate.bpb import assistant_span, bits_per_byte, score_spans  # noqa: E402
from fusion_ray.trainer.batches import collate  # noqa: E402
from fusion_ray.trainer.losses import batch_loss  # noqa: E402

COLUMNS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "transferred")


# ------------------------------------------------------------------ 1. data bundle
def export_bundle(cfg, out: str, heldout_rows: int | None = None) -> None:
    """fused/<pair> of a finished pipeline + pivot dir + held-out rows → one bundle dir."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from fusion_ray import io
    from fusion_ray.demo.scheme import resolve
    from fusion_ray.evaluate.stage import heldout

    os.makedirs(out, exist_ok=True)
    arrays = {}
    for _, pair in cfg.source_pairs():
        cols: dict[str, list] = {c: [] for c in COLUMNS}
        for path in io.list_files(cfg.stage_dir("fuse", pair)):
            table = pq.read_table(path, columns=list(COLUMNS))
            for c in COLUMNS:
                cols[c] += table.column(c).to_pylist()
        lengths = np.array([len(x) for x in cols["input_ids"]])
        scored = np.array([len(x) for x in cols["transferred"]])
        arrays[f"{pair}/input_ids"] = np.concatenate(cols["input_ids"]).astype(np.int32)
        arrays[f"{pair}/loss_mask"] = np.concatenate(cols["loss_mask"]).astype(bool)
        arrays[f"{pair}/topk_ids"] = np.concatenate([np.asarray(x, dtype=np.int32) for x in cols["topk_ids"]])
        arrays[f"{pair}/topk_logprobs"] = np.concatenate([np.asarray(x, dtype=np.float16)
                                                          for x in cols["topk_logprobs"]])
        arrays[f"{pair}/transferred"] = np.concatenate(cols["transferred"]).astype(bool)
        arrays[f"{pair}/lengths"], arrays[f"{pair}/scored"] = lengths, scored
    np.savez_compressed(f"{out}/fused.npz", **arrays)
    shutil.copytree(resolve(cfg.pivot.path), f"{out}/pivot", dirs_exist_ok=True)
    conv = heldout(cfg)
    if heldout_rows:
        conv = {d: c[:heldout_rows] for d, c in conv.items()}
    Path(f"{out}/heldout.json").write_text(json.dumps(conv))
    Path(f"{out}/meta.json").write_text(json.dumps({
        "pairs": {pair: s.domain for s, pair in zip(cfg.sources, [p for _, p in cfg.source_pairs()], strict=True)},
        "train": {k: getattr(cfg.train, k) for k in ("lr", "warmup_ratio", "weight_decay", "global_batch_size",
                                                     "micro_batch_size", "grad_clip", "epochs", "max_steps")},
        "max_length": cfg.data.max_length}))


# ------------------------------------------------------------------------ 2. sweep
def train_arm(bundle: str, rows: list[dict], meta: dict, *, lam: float, positions: str, tail: str,
              temperature: float, seed: int, device: str, steps: int | None = None):
    """The pivot trained on `rows` by the code the train stage runs: its batches (`collate`), its
    step's forward and loss (`batch_loss`), its optimizer, schedule, accumulation and clipping
    (the `ddp` strategy's, as `Local`), on one process: micro-batches of the stage's size,
    accumulated to its global batch."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.trainer.strategies import Local, lr_lambda

    t = SimpleNamespace(**meta["train"])
    micro = getattr(t, "micro_batch_size", t.global_batch_size)  # bundles of before it was exported
    accum = max(1, t.global_batch_size // micro)
    tok = tokenizers.from_dir(f"{bundle}/pivot")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(f"{bundle}/pivot", dtype=torch.float32).to(device)
    total = steps or t.max_steps or t.epochs * (len(rows) // t.global_batch_size)
    strategy = Local(model, t, lr_lambda(total, t.warmup_ratio), accum)
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < total * t.global_batch_size:
        order += torch.randperm(len(rows), generator=g).tolist()
    model.train()
    for i in range(total * accum):
        batch = collate([rows[j] for j in order[i * micro:(i + 1) * micro]], tok.pad_token_id, meta["max_length"])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = batch_loss(model, batch, lam=lam, tail=tail, temperature=temperature, fusion_positions=positions)
        strategy.backward(out["loss"])
        if (i + 1) % accum == 0:
            strategy.step()
    return model, tok


def evaluate(model, tok, heldout: dict, max_length: int) -> dict[str, float]:
    out = {}
    for domain, convs in heldout.items():
        spans = [assistant_span(tok, m) for m in convs]
        nll, n_bytes = score_spans(_OnDevice(model), tok, [s for s, _ in spans], [i for _, i in spans],
                                   batch_size=32, max_length=max_length)
        out[domain] = bits_per_byte(nll, n_bytes)
    return out


class _OnDevice(torch.nn.Module):
    """Moves the tokenizer's CPU tensors to the model's device; returns CPU logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        device = next(self.model.parameters()).device
        out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        out.logits = out.logits.float().cpu()
        return out


def settings(lambdas, positions, tails, temperatures):
    return [dict(lam=a, positions=b, tail=c, temperature=d)
            for a, b, c, d in itertools.product(lambdas, positions, tails, temperatures)]


def load_rows(bundle: str) -> dict[str, list[dict]]:
    """pair → fused rows (numpy arrays) from a bundle's flat arrays."""
    import numpy as np

    flat = np.load(f"{bundle}/fused.npz")
    pairs = sorted({k.split("/")[0] for k in flat.files})
    out = {}
    for pair in pairs:
        a = {c: flat[f"{pair}/{c}"] for c in COLUMNS + ("lengths", "scored")}
        ends, pends = np.cumsum(a["lengths"]), np.cumsum(a["scored"])
        rows = []
        for i, (end, pend) in enumerate(zip(ends, pends, strict=True)):
            start, pstart = end - a["lengths"][i], pend - a["scored"][i]
            rows.append({"input_ids": a["input_ids"][start:end], "loss_mask": a["loss_mask"][start - i:end - i - 1],
                         "topk_ids": a["topk_ids"][pstart:pend], "topk_logprobs": a["topk_logprobs"][pstart:pend],
                         "transferred": a["transferred"][pstart:pend]})
        out[pair] = rows
    return out


_CACHE: dict = {}


def setting_key(s: dict) -> str:
    return f"λ={s['lam']} {s['positions']} {s['tail']} T={s['temperature']}"


def merge_one(bundle: str, pairs: list[str], setting: dict, seed: int, device: str, states: str) -> list[dict]:
    """The pairwise targets merged (plain average, FuseChat-2 SCE, VaRM, all from the pivot), scored."""
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.merge import methods

    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    meta = json.loads(Path(f"{bundle}/meta.json").read_text())
    heldout = json.loads(Path(f"{bundle}/heldout.json").read_text())
    sds = [torch.load(f"{states}/{Path(bundle).name}-{seed}-{p}-{setting_key(setting)}.pt") for p in pairs]
    model = AutoModelForCausalLM.from_pretrained(f"{bundle}/pivot", dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tok = tokenizers.from_dir(f"{bundle}/pivot")
    merges = {"avg": lambda k: sum(sd[k] for sd in sds) / len(sds),
              "sce": lambda k: methods.sce(base[k], [sd[k] for sd in sds], select_topk=1.0, variant="fusechat"),
              "varm": lambda k: methods.varm(base[k], [sd[k] for sd in sds])}
    out = []
    for name, fn in merges.items():
        model.load_state_dict({k: fn(k) for k in sds[0]})
        bpb = evaluate(model.to(device), tok, heldout, meta["max_length"])
        model.to("cpu")
        out.append({"bundle": Path(bundle).name, "arm": f"merged_{name}", "pair": "+".join(pairs), "seed": seed,
                    **setting, "bpb": bpb, "domain": None, "seconds": 0.0})
    return out


def run_one(bundle: str, arm: str, pair: str, setting: dict, seed: int, device: str, steps: int | None,
            states: str | None = None) -> dict:
    """Train one arm for one seed and score it (one process of the pool)."""
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "1")))
    if bundle not in _CACHE:
        _CACHE[bundle] = (load_rows(bundle), json.loads(Path(f"{bundle}/meta.json").read_text()),
                          json.loads(Path(f"{bundle}/heldout.json").read_text()))
    data, meta, heldout = _CACHE[bundle]
    t0 = time.time()
    model, tok = train_arm(bundle, data[pair], meta, seed=seed, device=device, steps=steps, **setting)
    bpb = evaluate(model, tok, heldout, meta["max_length"])
    if states:
        os.makedirs(states, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()},
                   f"{states}/{Path(bundle).name}-{seed}-{pair}-{setting_key(setting)}.pt")
    return {"bundle": Path(bundle).name, "arm": arm, "pair": pair, "seed": seed, **setting, "bpb": bpb,
            "domain": meta["pairs"].get(pair), "seconds": round(time.time() - t0, 1)}


def sweep(bundle: str, out: str, seeds: list[int], grid: list[dict], device: str, steps: int | None = None,
          workers: int = 1, log=print) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    pairs = sorted(json.loads(Path(f"{bundle}/meta.json").read_text())["pairs"])
    jobs = [("clm_only", pairs[0], dict(lam=1.0, positions="all", tail="bucket", temperature=1.0))]
    jobs += [(f"fused:{pair}", pair, s) for s in grid for pair in pairs]
    results_path = Path(out) / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    states = f"{out}/states"

    def collect(futures):
        for fut in as_completed(futures):
            recs = fut.result()
            for rec in recs if isinstance(recs, list) else [recs]:
                results.append(rec)
                with open(results_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                    log(f"{rec['bundle']} seed {rec['seed']} {rec['arm']:<18} {setting_key(rec)}  "
                    + "  ".join(f"{d} {v:.4f}" for d, v in rec["bpb"].items()) + f"  ({rec['seconds']}s)",
                    flush=True)

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        collect([pool.submit(run_one, bundle, arm, pair, s, seed, device, steps, states)
                 for seed in seeds for arm, pair, s in jobs])
        if len(pairs) > 1:  # then the plain average of the pairwise targets
            collect([pool.submit(merge_one, bundle, pairs, s, seed, device, states) for seed in seeds for s in grid])
    return results


# ---------------------------------------------------------------------- 3. summary
def deltas(results: list[dict], bundle: str) -> dict:
    """setting → domain → [Δ per seed] (fused target on its source's domain − CLM-only)."""
    clm = {r["seed"]: r["bpb"] for r in results if r["bundle"] == bundle and r["arm"] == "clm_only"}
    out: dict = {}
    for r in results:
        if r["bundle"] != bundle or not r["arm"].startswith("fused:") or r["seed"] not in clm:
            continue
        key = f"λ={r['lam']} {r['positions']} {r['tail']} T={r['temperature']}"
        d = r["domain"]
        out.setdefault(key, {}).setdefault(d, []).append(r["bpb"][d] - clm[r["seed"]][d])
    return out


def merged_deltas(results: list[dict], bundle: str) -> dict:
    """setting → domain → [Δ per seed] of the averaged targets against CLM-only, on every domain."""
    clm = {r["seed"]: r["bpb"] for r in results if r["bundle"] == bundle and r["arm"] == "clm_only"}
    out: dict = {}
    for r in results:
        if r["bundle"] == bundle and r["arm"].startswith("merged_") and r["seed"] in clm:
            for d, v in r["bpb"].items():
                out.setdefault(setting_key(r), {}).setdefault(r["arm"], {}).setdefault(d, []).append(
                    v - clm[r["seed"]][d])
    return out


def mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 5), "std": round(statistics.stdev(xs), 5) if len(xs) > 1 else 0.0}


def summarize(results: list[dict], main: str, control: str | None, log=print) -> dict:
    d_main = deltas(results, main)
    d_ctrl = deltas(results, control) if control else {}
    d_merged = merged_deltas(results, main)
    best, best_eff, table = None, None, {}
    for key, per_domain in d_main.items():
        row = {d: mean_std(v) for d, v in per_domain.items()}
        eff, by_domain = None, {}
        if key in d_ctrl:
            ratios = [statistics.fmean(per_domain[d]) / statistics.fmean(d_ctrl[key][d])
                      for d in per_domain if d in d_ctrl[key] and statistics.fmean(d_ctrl[key][d]) < 0]
            eff = statistics.fmean(ratios) if ratios else None
            # per source (its domain): the ratio seed by seed (same seed, same CLM-only), mean ± std
            by_domain = {d: mean_std([a / b for a, b in zip(per_domain[d], d_ctrl[key][d], strict=True)])
                         for d in per_domain if d in d_ctrl[key] and len(per_domain[d]) == len(d_ctrl[key][d])}
        table[key] = {"delta_bpb": row, "transfer_efficiency": eff, "efficiency_by_source": by_domain,
                      "control": {d: mean_std(v) for d, v in d_ctrl.get(key, {}).items()},
                      "merged": {arm: {d: mean_std(v) for d, v in per.items()}
                                 for arm, per in d_merged.get(key, {}).items()}}
        log(f"{key:<36} Δbpb " + "  ".join(f"{d} {s['mean']:+.4f}±{s['std']:.4f}" for d, s in row.items())
            + ("" if key not in d_ctrl else "  | shared tokenizer " + "  ".join(
                f"{d} {s['mean']:+.4f}" for d, s in table[key]["control"].items()))
            + ("" if eff is None else f"  | efficiency {eff:.2f} ("
               + ", ".join(f"{d} {v['mean']:.2f}±{v['std']:.2f}" for d, v in by_domain.items()) + ")")
            + "".join(f"  | {arm} " + " ".join(f"{d} {s['mean']:+.4f}" for d, s in per.items())
                      for arm, per in table[key]["merged"].items()))
        score = max(s["mean"] for s in row.values())  # the domain that gains least
        if best is None or score < best[0]:
            best, best_eff = (score, key), eff
    return {"best": best[1] if best else None, "table": table, "transfer_efficiency": best_eff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", help="existing bundle dir(s): skip step 1")
    p.add_argument("--control", help="name of the shared-tokenizer bundle among --bundle")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lambdas", default="0.7,0.9")
    p.add_argument("--positions", default="transferred")
    p.add_argument("--tails", default="bucket")
    p.add_argument("--temperatures", default="1.0")
    p.add_argument("--steps", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bundles-only", action="store_true", help="stop after step 1")
    p.add_argument("--workers", type=int, default=1, help="arms trained in parallel processes")
    p.add_argument("--from-results", help="only summarise an earlier run's results.jsonl")
    p.add_argument("--main", default="bundle_main", help="with --from-results: the main bundle's name")
    p.add_argument("--no-control", action="store_true", help="step 1 without the shared-tokenizer control")
    p.add_argument("--variants", default="renormalize",
                   help="align.prefix variants of the main bundle, e.g. renormalize,label,exact (step 1)")
    p.add_argument("--pivot-tokenizer", help="step 1 with a pivot twin of this demo tokenizer family (e.g. mistral: "
                   "SentencePiece with a dummy prefix) and controls to match")
    args = p.parse_args()
    if args.from_results:
        results = [json.loads(line) for line in open(args.from_results)]
        names = list(dict.fromkeys(r["bundle"] for r in results))
        main_first = [args.main] + [n for n in names if n != args.main]
        return report_all(results, main_first, args.control, args.bundle or [])
    grid = settings([float(x) for x in args.lambdas.split(",")], args.positions.split(","),
                    args.tails.split(","), [float(x) for x in args.temperatures.split(",")])
    bundles = args.bundle or build_bundles(args.out, tuple(args.variants.split(",")), not args.no_control,
                                           args.pivot_tokenizer)
    if args.bundles_only:
        return print(json.dumps({"bundles": bundles}))
    control = args.control or next((Path(b).name for b in bundles if Path(b).name == "bundle_control"), None)
    results = []
    for bundle in bundles:
        results += sweep(bundle, args.out, list(range(args.seeds)), grid, args.device, args.steps, args.workers)
    report_all(results, [Path(b).name for b in bundles], control, bundles)


def report_all(results: list[dict], names: list[str], control: str | None, dirs: list[str]) -> None:
    """The summary of each main bundle (the first is the headline; the others, the other
    `align.prefix` variants, under `by_variant`), against the control; with the bundle dirs
    at hand, also the teacher's mass on the gold token per bundle (`gold_mass`)."""
    where = {Path(d).name: d for d in dirs}
    mains = [n for n in names if n != control]
    seeds = len({r["seed"] for r in results})
    by_variant = {}
    for name in mains[1:]:
        print(f"--- {name}")
        summary = summarize(results, name, control)
        best = summary["table"][summary["best"]]
        by_variant[name] = {"transfer_efficiency": summary["transfer_efficiency"], "setting": summary["best"],
                            "efficiency_by_source": best["efficiency_by_source"], "delta_bpb": best["delta_bpb"],
                            "by_setting": {k: {"transfer_efficiency": v["transfer_efficiency"],
                                               "efficiency_by_source": v["efficiency_by_source"]}
                                           for k, v in summary["table"].items()}}
        if name in where:
            by_variant[name]["gold_mass"] = gold_mass(where[name])
    print(f"--- {mains[0]}")
    summary = summarize(results, mains[0], control)
    extra = {"by_variant": by_variant}
    if mains[0] in where:
        extra["gold_mass"] = gold_mass(where[mains[0]])
    if control in where:
        extra["control_gold_mass"] = gold_mass(where[control])
    report(summary, seeds, extra)


def report(summary: dict, seeds: int, extra: dict | None = None) -> None:
    """The best setting is the one whose fused targets gain most on the domain that gains least."""
    best = summary["table"][summary["best"]]
    print(f"best setting: {summary['best']}")
    print(json.dumps({"delta_bpb": best["delta_bpb"], "transfer_efficiency": summary["transfer_efficiency"],
                      "setting": summary["best"], "seeds": seeds,
                      "efficiency_by_source": best["efficiency_by_source"],
                      "transfer_efficiency_by_setting": {k: None if v["transfer_efficiency"] is None
                                                         else round(v["transfer_efficiency"], 3)
                                                         for k, v in summary["table"].items()},
                      "merged_delta_bpb": best["merged"], **(extra or {})}))


def build_bundles(out: str, variants: tuple[str, ...] = ("renormalize",), control: bool = True,
                  pivot_tokenizer: str | None = None, log=print) -> list[str]:
    """Step 1: run the pipeline up to `fuse` for the demo, once per `align.prefix` variant (one
    workdir: only the sources' collect reruns, for `exact`), and for the shared-tokenizer control.
    Bundles: `bundle_main` (the first variant), `bundle_main_<variant>` (the others), `bundle_control`.

    `pivot_tokenizer` (a demo tokenizer family, e.g. `mistral`: SentencePiece with a dummy prefix)
    replaces the pivot by a twin with that tokenizer (same architecture, mix and steps), and the
    control's sources by twins with it; a source that already has it is its own control."""
    import dataclasses

    from fusion_ray.config import load_config
    from fusion_ray.demo.assets import CORPUS_FILES, DEFAULT_SPEC, default_demo_config
    from fusion_ray.demo.build import build_model_once, read_jsonl
    from fusion_ray.demo.builds import ensure_assets
    from fusion_ray.pipeline import run_stages

    root = ensure_assets(log=log)
    rows = {name: read_jsonl(root / "corpus" / f"{name}.jsonl") for name in CORPUS_FILES}
    pivot = next(m for m in DEFAULT_SPEC.models if m.name == "pivot")
    overrides = []
    if pivot_tokenizer and pivot_tokenizer != pivot.tokenizer:
        pivot = dataclasses.replace(pivot, name=f"pivot_{pivot_tokenizer}", tokenizer=pivot_tokenizer)
        build_model_once(DEFAULT_SPEC, pivot, rows, root / "models", log)
        overrides = [f"pivot.path={root / 'models' / pivot.name}"]
    controls = []
    for src in (m for m in DEFAULT_SPEC.models if m.name != "pivot" and control):  # same arch, mix, steps
        if src.tokenizer == pivot.tokenizer:
            controls.append(root / "models" / src.name)
            continue
        name = "control_" + ("" if pivot.name == "pivot" else f"{pivot.tokenizer}_") + src.name
        twin = dataclasses.replace(src, name=name, tokenizer=pivot.tokenizer)  # pivot's tokenizer
        build_model_once(DEFAULT_SPEC, twin, rows, root / "models", log)
        controls.append(root / "models" / twin.name)
    ctrl = [("control", load_config(default_demo_config(), [f"workdir={out}/pipeline_control", *overrides]
                                    + [f"sources.{i}.path={p}" for i, p in enumerate(controls)]))] if control else []
    bundles = []
    runs = [(("main" if i == 0 else f"main_{v}"), load_config(default_demo_config(), [
        f"workdir={out}/pipeline_main", f"align.prefix={v}", *overrides])) for i, v in enumerate(variants)]
    for name, cfg in [*runs, *ctrl]:
        run_stages(cfg, ["prepare", "collect", "align", "fuse"], log=log)
        export_bundle(cfg, f"{out}/bundle_{name}")
        bundles.append(f"{out}/bundle_{name}")
    return bundles


def gold_mass(bundle: str) -> dict[str, float]:
    """pair → the fused teacher's mean probability of the next (gold) pivot token over the
    positions a source reached: a teacher that leaks the label puts more there than the
    shared-tokenizer control's does."""
    import numpy as np

    rows = load_rows(bundle)
    out = {}
    for pair, rs in rows.items():
        total, n = 0.0, 0
        for r in rs:
            gold = r["input_ids"][1:][r["loss_mask"]]
            for g, ids, lps, t in zip(gold, r["topk_ids"], r["topk_logprobs"], r["transferred"], strict=True):
                if t:
                    hit = ids == g
                    total += float(np.exp(lps[hit].astype(np.float64)).sum()) if hit.any() else 0.0
                    n += 1
        out[pair] = round(total / max(n, 1), 4)
    return out


if __name__ == "__main__":
    main()
