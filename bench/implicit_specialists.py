"""How reliably the implicit default's build makes each source the specialist of its operation,
over seeds and training lengths: what `IMPLICIT_MODELS`' step counts are chosen from.

For each seed, the shipped `fusion_ray.demo.build_implicit` builds the prompts of
`ImplicitSpec(seed=…)` and then the chosen source models (`build_model_once`: the same training,
the same card), each at each `--steps` value, in a scratch cache. A model's card reads its
held-out accuracy on its own operation: greedy, per sampled draw, and the share of prompts with at
least one correct draw among `eval_samples` at the sample stage's default temperature (what the
reward stage's verifier can keep as SFT data). Seeds stand in for what a build on another CPU
changes (bf16/fp32 kernels, ISA): the same code, other rounding, another model.

Usage: python bench/implicit_specialists.py [--models implicit_source_sub] [--steps 300 500]
       [--seeds 0 1 2 3]
Last line: one JSON object: `cards` ({model: {steps: {seed: {greedy, sampled, any_sampled,
train_seconds}}}}) and `worst_any_sampled` ({model: {steps: min over seeds}}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from fusion_ray.demo import build_implicit
from fusion_ray.demo.assets import build_precision
from fusion_ray.demo.build import read_jsonl
from fusion_ray.demo.implicit import DEFAULT_SPEC


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["implicit_source_sub"])
    ap.add_argument("--steps", nargs="+", type=int, default=[300, 500])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    args = ap.parse_args()
    by_name = {m.name: m for m in DEFAULT_SPEC.models}
    unknown = [m for m in args.models if m not in by_name]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(by_name)}")
    print(f"precision: {build_precision()}")
    cards: dict = {m: {str(s): {} for s in args.steps} for m in args.models}
    with tempfile.TemporaryDirectory(prefix="implicit-specialists-") as scratch:
        for seed in args.seeds:
            spec = dataclasses.replace(DEFAULT_SPEC, seed=seed)
            root = Path(scratch) / f"seed{seed}"
            corpus = build_implicit.build_corpus_once(spec, root / "corpus", log=lambda *_: None)
            chat = read_jsonl(corpus / "chat" / "train.jsonl")
            heldout = read_jsonl(corpus / "arith_heldout.jsonl")
            for name in args.models:
                op = name.rsplit("_", 1)[-1]
                for steps in args.steps:
                    model = dataclasses.replace(by_name[name], steps=steps)
                    card = build_implicit.build_model_once(spec, model, chat, heldout, root / f"models-{steps}",
                                                           log=lambda *_: None)
                    own = card["heldout_accuracy"][op]
                    cards[name][str(steps)][str(seed)] = {**{k: own[k] for k in ("greedy", "sampled", "any_sampled")},
                                                          "train_seconds": card["train_seconds"]}
                    print(f"{name} steps {steps} seed {seed}: {op} greedy {own['greedy']:.3f} sampled "
                          f"{own['sampled']:.3f} any-of-{spec.eval_samples} {own['any_sampled']:.3f} "
                          f"(trained in {card['train_seconds']} s)", flush=True)
    worst = {m: {s: min(c["any_sampled"] for c in per.values()) for s, per in by_steps.items()}
             for m, by_steps in cards.items()}
    for m, by_steps in worst.items():
        for s, w in by_steps.items():
            print(f"{m} steps {s}: worst any-of-{DEFAULT_SPEC.eval_samples} over seeds {w:.3f}")
    print(json.dumps({"precision": build_precision(), "cards": cards, "worst_any_sampled": worst}))


if __name__ == "__main__":
    main()
