"""LoRA (`train.peft`) against full fine-tuning on a ~130M-parameter Llama-shaped model (random init, CPU).

- `lora_trainable_fraction`: trainable / total parameters once `fusion_ray.trainer.lora.apply_lora`
  has wrapped the model (the total counts the adapters too), at the run's rank and target modules.
- `lora_peak_ratio`: peak RSS of a few training steps with LoRA / the same steps with full
  fine-tuning. Each case runs in its own fresh process (`--case`), which builds the model, wraps it
  (LoRA only), and takes `steps` AdamW steps (the train loop's `Local` strategy: clipping, schedule;
  the optimizer holds the trainable parameters only) of plain CLM on random tokens; its figure is
  the process's peak RSS (`ru_maxrss`).

Usage: python bench/train_lora.py [--steps 3] [--seq 256] [--rank 16] [--targets all-linear]
The last line is one JSON object with the figures (`lora_case(...)` returns it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Llama-shaped, ~134M parameters (untied embeddings of a 32k vocabulary)
SHAPE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def build(rank: int, targets: list[str] | str, lora: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_ray.config import PeftSettings
    from fusion_ray.trainer.lora import apply_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    if lora:
        model = apply_lora(model, PeftSettings(rank=rank, alpha=2 * rank, target_modules=targets), base_ref="random")
    return model


def run_case(case: str, steps: int, seq: int, rank: int, targets: list[str] | str) -> dict:
    """One case in this process: build, wrap (lora), train `steps` steps; peak RSS and step time."""
    from types import SimpleNamespace

    import torch

    from fusion_ray.trainer.lora import trainable_fraction
    from fusion_ray.trainer.strategies import Local, lr_lambda

    torch.set_num_threads(2)
    model = build(rank, targets, case == "lora")
    trainable, total = trainable_fraction(model)
    strategy = Local(model, SimpleNamespace(lr=1e-4, weight_decay=0.0, grad_clip=1.0), lr_lambda(steps, 0.0))
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps):
        started = time.monotonic()
        loss = strategy.model(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()
        times.append(time.monotonic() - started)
    return {"case": case, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": trainable, "total": total, "step_s": sorted(times)[len(times) // 2],
            "loss": float(loss)}


def fresh(case: str, steps: int, seq: int, rank: int, targets: list[str] | str) -> dict:
    args = [sys.executable, __file__, "--case", case, "--steps", str(steps), "--seq", str(seq), "--rank", str(rank),
            "--targets", targets if isinstance(targets, str) else ",".join(targets)]
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lora_case(steps: int = 3, seq: int = 256, rank: int = 16, targets: list[str] | str = "all-linear") -> dict:
    """Full fine-tuning, then LoRA, each in a fresh process: the figures the issue names, and the cases."""
    full = fresh("full", steps, seq, rank, targets)
    print(f"full fine-tuning: peak RSS {full['peak_rss_mib']:.0f} MiB, {full['trainable'] / 1e6:.1f}M of "
          f"{full['total'] / 1e6:.1f}M parameters train, {full['step_s']:.2f} s/step", flush=True)
    lora = fresh("lora", steps, seq, rank, targets)
    print(f"LoRA r={rank} ({targets}): peak RSS {lora['peak_rss_mib']:.0f} MiB, {lora['trainable'] / 1e6:.2f}M of "
          f"{lora['total'] / 1e6:.1f}M parameters train, {lora['step_s']:.2f} s/step", flush=True)
    return {"lora_trainable_fraction": round(lora["trainable"] / lora["total"], 5),
            "lora_peak_ratio": round(lora["peak_rss_mib"] / full["peak_rss_mib"], 4),
            "params_m": round(full["total"] / 1e6, 1), "steps": steps, "seq": seq, "rank": rank,
            "targets": targets, "full": full, "lora": lora}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="all-linear, or module names joined by commas")
    parser.add_argument("--case", choices=["full", "lora"], help=argparse.SUPPRESS)  # one case, this process
    args = parser.parse_args()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.seq, args.rank, targets)))
        return
    result = lora_case(args.steps, args.seq, args.rank, targets)
    print(f"lora_trainable_fraction {result['lora_trainable_fraction']:.4f}, "
          f"lora_peak_ratio {result['lora_peak_ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
