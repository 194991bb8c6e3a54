"""Benchmark the train stage.

(a) Peak memory of our fusion loss (chunked, gradient computed in the forward and
    written over the logits) vs the dense reference (a dense [L, V] teacher built from
    the top-k, log-softmax, product, autograd), both forward + backward from the same
    logits, at V = 32k, L = 2048, k = 10. Each runs in its own fresh process; the figure
    is the peak RSS above the RSS once the inputs and logits exist.
(b) Tokens/s of a full training step (forward, loss, backward, AdamW) with the fusion
    term (λ = 0.9), its loss from the logits and from the hidden states (`batch_loss`,
    `loss_from="hidden"`), vs plain CLM through the model's own `labels=` loss, same tiny
    model and batch, alternating, median of repeats.
(c) Step time of DeepSpeed ZeRO-2 vs DDP in our real Ray Train loop on CPU (gloo,
    2 workers × 0.5 CPU, same synthetic fused dataset, model and steps), from the
    per-step times the loop logs (first steps dropped as warm-up).

Usage: python bench/train.py [--steps 30] [--skip-ray]
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

V, L, K, H = 32000, 2048, 10, 256


# ---------------------------------------------------------------- (a) loss memory
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(kind: str) -> None:
    """Run one loss variant forward + backward; print its peak RSS above the inputs."""
    from fusion_ray.trainer.losses import combined_loss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    hidden = torch.randn(1, L, H, requires_grad=True)
    weight = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    ids = torch.randint(0, V, (1, L))
    mask = torch.ones(1, L - 1, dtype=torch.bool)
    top_ids = torch.randint(0, V, (L - 1, K))  # a top-k teacher (no dense tensor in the set-up either)
    top_lp = torch.log_softmax(torch.randn(L - 1, K + 1), -1)[:, :K].contiguous()
    logits = hidden @ weight.T  # [1, L, V]: the model's fresh output, present in both variants
    base = _rss()
    if kind == "ours":
        out = combined_loss(logits, ids, mask, top_ids, top_lp, lambda_clm=0.9, tail="renormalize", inplace=True)
        loss = out["loss"]
    else:  # the dense reference: a dense teacher over the whole vocabulary
        pos = logits[:, :-1][mask]
        dense = torch.zeros(pos.shape, dtype=torch.float32).scatter_add_(-1, top_ids, torch.softmax(top_lp, -1))
        logp = torch.log_softmax(pos.float(), -1)
        fuse = -(dense * logp).sum(-1).mean()
        clm = torch.nn.functional.cross_entropy(pos.float(), ids[:, 1:][mask])
        loss = 0.9 * clm + 0.1 * fuse
    loss.backward()
    print(json.dumps({"kind": kind, "extra_bytes": _peak_rss() - base, "loss": loss.item(),
                      "grad_norm": weight.grad.norm().item()}))


def loss_memory() -> dict:
    out = {}
    for kind in ("dense", "ours"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", kind], capture_output=True, text=True,
                              check=True)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    same = abs(out["ours"]["loss"] - out["dense"]["loss"]) / abs(out["dense"]["loss"])
    grad = abs(out["ours"]["grad_norm"] - out["dense"]["grad_norm"]) / out["dense"]["grad_norm"]
    print(f"(a) loss memory at V={V}, L={L}, k={K} (forward + backward, above the logits): "
          f"dense {out['dense']['extra_bytes'] / 2**20:.0f} MiB, ours {out['ours']['extra_bytes'] / 2**20:.0f} MiB "
          f"(logits alone: {L * V * 4 / 2**20:.0f} MiB); same loss to {same:.1e}, same grad norm to {grad:.1e}")
    return {"ratio": out["ours"]["extra_bytes"] / out["dense"]["extra_bytes"], "dense_mib":
            out["dense"]["extra_bytes"] / 2**20, "ours_mib": out["ours"]["extra_bytes"] / 2**20}


# ---------------------------------------------------------- (b) fusion vs CLM speed
def tiny_model(vocab: int = 4099):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=384,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=True))


def throughput(repeats: int = 7, vocab: int = 4099) -> dict:
    from fusion_ray.trainer.losses import batch_loss, combined_loss

    torch.set_num_threads(2)
    b, length = 8, 256
    model = tiny_model(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    mask = torch.ones(b, length - 1, dtype=torch.bool)
    n = int(mask.sum())
    lp, top = torch.log_softmax(torch.randn(n, vocab, generator=g), -1).topk(10)
    labels = ids.clone()

    def fused_step():
        logits = model(input_ids=ids).logits
        combined_loss(logits, ids, mask, top, lp, lambda_clm=0.9, inplace=True)["loss"].backward()
        opt.step()
        opt.zero_grad()

    def clm_step():
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask, "topk_ids": top,
             "topk_logprobs": lp, "transferred": torch.ones(n, dtype=torch.bool)}

    def hidden_step():  # train.loss_from: hidden, the training loop's own call
        batch_loss(model, batch, lam=0.9, tail="bucket", temperature=1.0, fusion_positions="all",
                   loss_from="hidden")["loss"].backward()
        opt.step()
        opt.zero_grad()

    steps = (("fused", fused_step), ("hidden", hidden_step), ("clm", clm_step))
    times = {name: [] for name, _ in steps}
    for _, step in steps:  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps:
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    tps = {k: b * length / statistics.median(v) for k, v in times.items()}
    print(f"(b) training step, tiny Qwen2 (V={vocab}, batch {b}×{length}): fused λ=0.9 from logits "
          f"{tps['fused']:.0f} tok/s, from hidden states {tps['hidden']:.0f} tok/s, plain CLM {tps['clm']:.0f} tok/s")
    return {"ratio": tps["fused"] / tps["clm"], "hidden_ratio": tps["hidden"] / tps["clm"],
            **{f"{k}_tokens_per_s": v for k, v in tps.items()}}


# ------------------------------------------------------- (c) DeepSpeed vs DDP on Ray
def synthetic_workdir(root: str, rows: int, length: int, k: int = 10):
    """A pivot model dir and a finished `fused/syn` stage with random teachers."""
    import pyarrow as pa

    from fusion_ray import io, schema
    from fusion_ray.demo.assets import TinyModel
    from fusion_ray.demo.build import make_model
    from fusion_ray.demo.tokenizers import build_tokenizer

    pivot = os.path.join(root, "pivot")
    tok = build_tokenizer("deepseek", 1024, pivot)
    spec = TinyModel(name="pivot", architecture="qwen2", tokenizer="deepseek", vocab_size=1024, mix=(), steps=0)
    make_model(spec, tok).save_pretrained(pivot)
    vocab = len(tok)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(rows):
        ids = rng.integers(0, vocab, length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[length // 4:length - 1] = True
        n = int(mask.sum())
        top = rng.integers(0, vocab, (n, k)).astype(np.int32)
        lp = np.log(rng.dirichlet(np.ones(k + 1), n)[:, :k]).astype(np.float16)
        recs.append({"sample_id": f"s{i}", "domain": "syn", "input_ids": ids, "loss_mask": mask[:-1].tolist(),
                     "topk_ids": top.tolist(), "topk_logprobs": lp.tolist(), "transferred": [True] * n,
                     "weights": [0.0, 1.0]})
    table = pa.Table.from_pylist(recs, schema=schema.FUSED)
    fused = os.path.join(root, "work", "fused", "syn")
    out = io.StageOutput(fused, "syn")
    out.write_table("part-00000.parquet", table)
    out.commit(io.Manifest(stage="fuse", fingerprint="syn", config_hash="syn", inputs={}, rows={"out": rows},
                           extra={"pivot_vocab": vocab}, wall_time_s=0.0))
    return pivot


def ray_step_times(steps: int) -> dict:
    from fusion_ray.config import parse_config
    from fusion_ray.ray_env import init_ray
    from fusion_ray.train import stage as trainer

    root = tempfile.mkdtemp(prefix="bench-train-")
    length, micro, workers = 256, 4, 2
    global_batch = micro * workers  # no accumulation: one micro-batch per step per worker
    pivot = synthetic_workdir(root, rows=steps * global_batch, length=length)
    corpus = os.path.join(root, "c.jsonl")
    open(corpus, "w").write(json.dumps({"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": "y"}]}) + "\n")
    out = {}
    for strategy in ("ddp", "deepspeed"):
        cfg = parse_config({
            "name": "bench", "workdir": os.path.join(root, "work"),
            "pivot": {"name": "pivot", "path": pivot, "dtype": "float32"},
            "sources": [{"name": "syn", "path": pivot}], "data": {"train": [{"path": corpus}], "max_length": length},
            "ray": {"num_cpus": 4},
            "train": {"strategy": strategy, "zero_stage": 2, "bf16": False, "num_workers": workers,
                      "cpus_per_worker": 0.5, "global_batch_size": global_batch, "micro_batch_size": micro,
                      "max_steps": steps, "checkpoint_every": 10_000, "report_every": 10_000, "lr": 1e-4,
                      "lambda_clm": 0.9},
        })
        init_ray(cfg.ray)
        trainer.train_arm(cfg, f"syn-{strategy}", "fused", "syn", force=True, log=lambda *_: None)
        log = [json.loads(line) for line in open(os.path.join(cfg.stage_dir("train", f"syn-{strategy}"),
                                                              "train_log.jsonl"))]
        step_s = [r["step_s"] for r in log if "step_s" in r][3:]  # warm-up dropped
        out[strategy] = statistics.median(step_s)
        print(f"(c) {strategy}: median step {out[strategy] * 1000:.0f} ms over {len(step_s)} steps "
              f"({workers} workers × {micro}×{length} tokens, gloo, Ray Train)")
    import ray

    ray.shutdown()
    return {"ratio": out["deepspeed"] / out["ddp"], "ddp_step_s": out["ddp"], "deepspeed_step_s": out["deepspeed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--memory-child", choices=["ours", "dense"])
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    mem = loss_memory()
    print(f"    ratio ours/dense = {mem['ratio']:.3f} (goal ≤ 0.1)")
    speed = throughput()
    print(f"    ratio fused/CLM = {speed['ratio']:.3f} (goal ≥ 0.9); from hidden states/CLM = "
          f"{speed['hidden_ratio']:.3f}")
    figures = {"loss_memory_ratio": round(mem["ratio"], 4), "fusion_vs_clm_throughput": round(speed["ratio"], 3),
               "hidden_fusion_vs_clm_throughput": round(speed["hidden_ratio"], 3)}
    big = throughput(vocab=32000)  # the same at a real vocabulary (Llama-2's)
    print(f"    at V=32000: fused/CLM = {big['ratio']:.3f}, from hidden states/CLM = {big['hidden_ratio']:.3f}")
    figures.update({"fusion_vs_clm_throughput_32k": round(big["ratio"], 3),
                    "hidden_fusion_vs_clm_throughput_32k": round(big["hidden_ratio"], 3)})
    if not args.skip_ray:
        ds = ray_step_times(args.steps)
        print(f"    ratio DeepSpeed ZeRO-2 / DDP step time = {ds['ratio']:.3f}")
        figures["deepspeed_vs_ddp_step_ratio"] = round(ds["ratio"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
