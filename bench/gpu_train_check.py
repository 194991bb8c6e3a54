"""GPU check of the training step at real scale: memory and speed of the fusion loss's two paths.

A Llama-shaped model with random weights (≈1.1B parameters: hidden 2048, 16 layers, 16
heads, intermediate 5504, vocab 32000) in bf16 on CUDA, a few AdamW steps per case
(warm-up steps, then timed steps) on a batch of random token ids (4 × 2048) with a
synthetic top-k teacher (k = 10) at every scored position (the loss mask covers the
second half of each row):

- clm:               the model's own `labels=` loss (the baseline: plain CLM)
- logits:            λ·CLM + (1−λ)·fusion from the model's [B, L, V] logits (`combined_loss`)
- hidden:            the same loss from the last hidden state (`combined_loss_from_hidden`)
- logits_ckpt / hidden_ckpt: the same two with gradient checkpointing
- lora_hidden_ckpt:  LoRA (peft, r = 16, attention + MLP projections) + hidden + checkpointing
- logits_ckpt_128k / hidden_ckpt_128k (and without checkpointing): vocab 128256, the loss's share grows

Each case gets a fresh model and optimizer; its line says the peak CUDA memory
(`max_memory_allocated`, reset between cases), tokens/s over the timed steps and the loss
of the first and last step. A failing case (OOM included) is reported and the next one
runs. `--budget-s` stops starting cases when the next one would not fit. The last line is
one JSON object: per case {peak_gib, tokens_per_s, ...} and the ratios.

`--tiny`: everything shrunk, float32 on CPU (or on the GPU if there is one), < 60 s.
`--loss-memory`: the loss alone at V = 128k (N = 2048 positions, H = 512, k = 10) on
CPU, forward + backward from logits vs from hidden states, each in a fresh process; the
peak RSS (`ru_maxrss`) above a process that only builds the inputs, and the ratio.

Needs only torch, transformers (and peft for the LoRA case) and `fusion_ray.trainer.losses`
(no Ray). Run from the repository root:

    python bench/gpu_train_check.py            # on the GPU machine
    python bench/gpu_train_check.py --tiny     # anywhere
    python bench/gpu_train_check.py --loss-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: fusion_ray without installing it

from fusion_ray.trainer.losses import batch_loss, combined_loss, combined_loss_from_hidden  # noqa: E402

K = 10
LAM, TAIL, TEMPERATURE = 0.3, "bucket", 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int
    warmup: int
    steps: int


FULL = Shape(hidden=2048, layers=16, heads=16, intermediate=5504, batch=4, seq=2048, warmup=3, steps=5)
TINY = Shape(hidden=64, layers=2, heads=4, intermediate=128, batch=2, seq=64, warmup=1, steps=2)


@dataclass(frozen=True)
class Case:
    name: str
    loss: str  # "clm" | "logits" | "hidden"
    vocab: int
    ckpt: bool = False
    lora: bool = False


def cases(tiny: bool) -> list[Case]:
    small, big = (512, 4096) if tiny else (32000, 128256)
    return [
        Case("clm", "clm", small),
        Case("logits", "logits", small),
        Case("hidden", "hidden", small),
        Case("logits_ckpt", "logits", small, ckpt=True),
        Case("hidden_ckpt", "hidden", small, ckpt=True),
        Case("lora_hidden_ckpt", "hidden", small, ckpt=True, lora=True),
        Case("logits_ckpt_128k", "logits", big, ckpt=True),
        Case("hidden_ckpt_128k", "hidden", big, ckpt=True),
        Case("logits_128k", "logits", big),
        Case("hidden_128k", "hidden", big),
    ]


def build_model(shape: Shape, vocab: int, device: torch.device, dtype: torch.dtype, ckpt: bool, lora: bool):
    """A randomly initialised Llama of `shape` (seeded: every case starts from the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                         intermediate_size=shape.intermediate, max_position_embeddings=max(4096, shape.seq),
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS))
    return model


def make_batch(shape: Shape, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random ids; the second half of every row scored; a synthetic teacher: k ids with
    log-probs summing to 0.9 (a tail of 0.1) at every scored position."""
    g = torch.Generator().manual_seed(1)
    b, length = shape.batch, shape.seq
    input_ids = torch.randint(0, vocab, (b, length), generator=g)
    loss_mask = torch.zeros(b, length - 1, dtype=torch.bool)
    loss_mask[:, length // 2:] = True
    n = int(loss_mask.sum())
    topk_ids = torch.randint(0, vocab, (n, K), generator=g)
    probs = torch.softmax(torch.randn(n, K, generator=g) * 2, -1).sort(-1, descending=True).values * 0.9
    labels = input_ids.clone()
    labels[:, : length // 2 + 1] = -100  # the same scored tokens for the plain CLM baseline
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(b, length, dtype=torch.long),
             "loss_mask": loss_mask, "topk_ids": topk_ids, "topk_logprobs": probs.log(),
             "transferred": torch.ones(n, dtype=torch.bool), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def step_loss(model, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    if loss == "clm":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    return batch_loss(model, batch, lam=LAM, tail=TAIL, temperature=TEMPERATURE, fusion_positions="all",
                      loss_from=loss)["loss"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, shape: Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """Build, train `warmup + steps` steps, measure. Raises on failure (the caller reports it)."""
    model = optimizer = batch = None
    try:
        model = build_model(shape, case.vocab, device, dtype, case.ckpt, case.lora)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        batch = make_batch(shape, case.vocab, device)
        losses, started = [], 0.0
        for i in range(shape.warmup + shape.steps):
            if i == shape.warmup:
                _sync(device)
                started = time.perf_counter()
            loss = step_loss(model, batch, case.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        _sync(device)
        seconds = time.perf_counter() - started
        tokens = shape.batch * shape.seq * shape.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"peak_gib": None if peak is None else round(peak, 2), "tokens_per_s": round(tokens / seconds, 1),
                "loss_first": round(losses[0].item(), 4), "loss_last": round(losses[-1].item(), 4),
                "trainable_params": sum(p.numel() for p in params), "vocab": case.vocab}
    finally:
        del model, optimizer, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """hidden vs logits (peak memory, tokens/s) for each pair of cases, fusion vs plain CLM tokens/s."""
    out = {}

    def ok(name: str, key: str) -> float | None:
        value = results.get(name, {}).get(key)
        return value if isinstance(value, int | float) and value > 0 else None

    for suffix in ("", "_ckpt", "_ckpt_128k", "_128k"):
        for key, label in (("peak_gib", "peak"), ("tokens_per_s", "tokens_per_s")):
            a, b = ok("hidden" + suffix, key), ok("logits" + suffix, key)
            if a and b:
                out[f"hidden_vs_logits{suffix}_{label}"] = round(a / b, 3)
    for name in ("logits", "hidden"):
        a, b = ok(name, "tokens_per_s"), ok("clm", "tokens_per_s")
        if a and b:
            out[f"{name}_vs_clm_tokens_per_s"] = round(a / b, 3)
    return out


def train_check(tiny: bool, budget_s: float, only: list[str] | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and not tiny else torch.float32
    shape = TINY if tiny else FULL
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name} · dtype {str(dtype).removeprefix('torch.')} · batch {shape.batch}×{shape.seq} · "
          f"hidden {shape.hidden} · layers {shape.layers} · k {K} · λ {LAM} · {shape.warmup}+{shape.steps} steps",
          flush=True)
    start = time.monotonic()
    results: dict[str, dict] = {}
    longest = 0.0
    for case in cases(tiny):
        if only and case.name not in only:
            continue
        left = budget_s - (time.monotonic() - start)
        if left < 1.3 * longest + 5:
            results[case.name] = {"skipped": f"budget: {left:.0f} s left"}
            print(f"{case.name:>18}: skipped ({left:.0f} s of the budget left)", flush=True)
            continue
        if case.lora:
            try:
                import peft  # noqa: F401
            except ImportError:
                results[case.name] = {"skipped": "peft is not installed"}
                print(f"{case.name:>18}: skipped (peft is not installed)", flush=True)
                continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.monotonic()
        try:
            result = run_case(case, shape, device, dtype)
        except torch.cuda.OutOfMemoryError as exc:
            result = {"error": "OOM", "detail": str(exc).splitlines()[0][:200]}
        except Exception as exc:  # report and go on with the next case
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        took = time.monotonic() - began
        longest = max(longest, took)
        result["case_s"] = round(took, 1)
        results[case.name] = result
        if "error" in result:
            print(f"{case.name:>18}: FAILED {result['error']} ({took:.0f} s)", flush=True)
        else:
            peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.2f} GiB"
            print(f"{case.name:>18}: peak {peak:>10} · {result['tokens_per_s']:>9.0f} tokens/s · loss "
                  f"{result['loss_first']:.4f} → {result['loss_last']:.4f} · V {case.vocab} · {took:.0f} s",
                  flush=True)
    return {"device": name, "dtype": str(dtype), "tiny": tiny, "cases": results, "ratios": ratios(results),
            "total_s": round(time.monotonic() - start, 1)}


# ---------------------------------------------------------------- the loss alone, CPU peak RSS
LOSS_V, LOSS_N, LOSS_H = 128256, 2048, 512


def _loss_memory_case(case: str) -> dict:
    """One case in this (fresh) process: build the inputs, then forward + backward of the loss."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, LOSS_N + 1, LOSS_H, generator=g).requires_grad_(True)
    weight = (torch.randn(LOSS_V, LOSS_H, generator=g) * 0.02).requires_grad_(True)
    input_ids = torch.randint(0, LOSS_V, (1, LOSS_N + 1), generator=g)
    loss_mask = torch.ones(1, LOSS_N, dtype=torch.bool)
    topk_ids = torch.randint(0, LOSS_V, (LOSS_N, K), generator=g)
    topk_lp = (torch.softmax(torch.randn(LOSS_N, K, generator=g), -1) * 0.9).log()
    args = (input_ids, loss_mask, topk_ids, topk_lp)
    kw = {"lambda_clm": LAM, "tail": TAIL, "temperature": TEMPERATURE}
    began = time.perf_counter()
    if case == "logits":  # what batch_loss does today: the model's logits, the gradient written over them
        logits = hidden @ weight.t()
        combined_loss(logits, *args, inplace=True, **kw)["loss"].backward()
    elif case == "hidden":
        combined_loss_from_hidden(hidden, weight, *args, **kw)["loss"].backward()
    elif case != "setup":
        raise ValueError(case)
    return {"case": case, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": round(time.perf_counter() - began, 2)}


def loss_memory() -> dict:
    """Each case in a fresh process; the peak RSS above the `setup` process (inputs only)."""
    runs = {}
    for case in ("setup", "logits", "hidden"):
        out = subprocess.run([sys.executable, __file__, "--loss-memory-case", case], capture_output=True, text=True,
                             check=True)
        runs[case] = json.loads(out.stdout.strip().splitlines()[-1])
    base = runs["setup"]["maxrss_mib"]
    above = {case: runs[case]["maxrss_mib"] - base for case in ("logits", "hidden")}
    for case in ("logits", "hidden"):
        print(f"loss alone V {LOSS_V} N {LOSS_N} H {LOSS_H}, {case:>6}: peak RSS {runs[case]['maxrss_mib']:.0f} MiB, "
              f"{above[case]:.0f} MiB above the inputs · {runs[case]['seconds']} s", flush=True)
    return {"vocab": LOSS_V, "positions": LOSS_N, "hidden": LOSS_H, "setup_maxrss_mib": round(base),
            "logits_above_mib": round(above["logits"]), "hidden_above_mib": round(above["hidden"]),
            "logits_seconds": runs["logits"]["seconds"], "hidden_seconds": runs["hidden"]["seconds"],
            "hidden_vs_logits_peak_above_inputs": round(above["hidden"] / max(above["logits"], 1e-9), 3),
            "hidden_vs_logits_peak_rss": round(runs["hidden"]["maxrss_mib"] / runs["logits"]["maxrss_mib"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="shrink everything: float32, runs on CPU in < 60 s")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no case that would end past this")
    parser.add_argument("--cases", nargs="*", help="run only these cases (names as printed)")
    parser.add_argument("--loss-memory", action="store_true", help="the loss alone at V = 128k on CPU (peak RSS)")
    parser.add_argument("--loss-memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_memory_case:
        print(json.dumps(_loss_memory_case(args.loss_memory_case)))
        return
    summary = loss_memory() if args.loss_memory else train_check(args.tiny, args.budget_s, args.cases)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
