"""The demo models' training step in fp32 and in bf16 autocast, on this CPU as it is and with oneDNN
and ATen held to AVX2 (a CPU without native bf16): why `fusion_ray.demo.assets.build_precision`
trains in bf16 only where the CPU has it.

Each case is a fresh process (the ISA limits must be set before torch loads) that runs the shipped
`fusion_ray.demo.build.train` (AdamW, schedule, clipping, `training_autocast()`) for `--steps`
steps of each of the explicit default's three models on random tokens of the demo's batch
(16 × 256); `FUSION_RAY_DEMO_PRECISION` picks the precision. The figure is seconds per step (the
whole call over its steps, the first step's warm-up included).

Usage: python bench/demo_precision.py [--steps 8]
Last line: one JSON object: `chosen_precision` (what a build picks here), `native_bf16`, seconds
per step per ISA, precision and model, `bf16_vs_fp32_step_time` per ISA (the three models' step
times summed, bf16 over fp32), and `est_train_s` (each model's default steps × its step time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


class _Ids:
    """The special ids and length `make_model` reads from a tokenizer (the demo's cut vocabulary)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def run_case(steps: int) -> dict:
    """In this process: `steps` training steps of each default model; seconds per step."""
    import dataclasses
    import time

    import torch

    from fusion_ray.demo.assets import DEFAULT_MODELS, DEFAULT_SPEC, build_precision
    from fusion_ray.demo.build import make_model, train

    out = {}
    for model in DEFAULT_MODELS:
        torch.manual_seed(0)
        net = make_model(model, _Ids(model.vocab_size))
        short = dataclasses.replace(model, steps=steps)
        data = torch.randint(3, model.vocab_size, (steps * DEFAULT_SPEC.batch_size, DEFAULT_SPEC.seq_len))
        started = time.perf_counter()
        train(net, data, short, DEFAULT_SPEC, log=lambda *_: None)
        out[model.name] = round((time.perf_counter() - started) / steps, 4)
    return {"precision": build_precision(), "s_per_step": out,
            "capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.steps)))
        return

    from fusion_ray.demo.assets import DEFAULT_MODELS, build_precision, cpu_has_native_bf16

    native = cpu_has_native_bf16(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else False

    env_base = {k: v for k, v in os.environ.items() if k not in ("FUSION_RAY_DEMO_PRECISION", *ISAS["avx2"])}
    env_base["PYTHONPATH"] = f"{REPO}:{env_base.get('PYTHONPATH', '')}"
    per_step: dict = {}
    for isa, extra in ISAS.items():
        per_step[isa] = {}
        for precision in ("fp32", "bf16"):
            env = {**env_base, **extra, "FUSION_RAY_DEMO_PRECISION": precision}
            done = subprocess.run([sys.executable, __file__, "--case", "--steps", str(args.steps)], env=env,
                                  capture_output=True, text=True, check=True)
            case = json.loads(done.stdout.strip().splitlines()[-1])
            per_step[isa][precision] = case["s_per_step"]
            print(f"{isa:6} ({case['capability']}) {precision}: "
                  + ", ".join(f"{m} {s:.3f} s/step" for m, s in case["s_per_step"].items()), flush=True)
    steps = {m.name: m.steps for m in DEFAULT_MODELS}
    ratio = {isa: round(sum(p["bf16"].values()) / sum(p["fp32"].values()), 3) for isa, p in per_step.items()}
    est = {isa: {prec: round(sum(steps[m] * s for m, s in times.items())) for prec, times in p.items()}
           for isa, p in per_step.items()}
    for isa in ISAS:
        print(f"{isa}: bf16 / fp32 step time {ratio[isa]}; the three models' training "
              f"{est[isa]['fp32']} s in fp32, {est[isa]['bf16']} s in bf16")
    print(json.dumps({"chosen_precision": build_precision(), "native_bf16": native,
                      "bf16_vs_fp32_step_time": ratio, "est_train_s": est, "s_per_step": per_step,
                      "steps": args.steps}))


if __name__ == "__main__":
    main()
