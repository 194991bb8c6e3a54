"""Benchmark sequence packing (`train.packing`): real (non-pad) tokens per second of training steps
on the same conversations, packed vs unpacked, side by side in one process.

Rows: the explicit demo's fused rows when a finished `fused/<pair>/` is found (`--fused DIR`, else
`runs/tiny_cpu/fused/*` below the working directory); otherwise conversations of the demo chat
corpus (both domains, alternating), rendered and tokenized as `prepare`/`collect` do with the demo
pivot's tokenizer (its chat template; the assistant replies scored), with a top-10 teacher of random
ids and valid log-probs (the loss's cost does not depend on their values).

A step is what the training loop runs per micro-batch and optimizer step: `collate` or
`collate_packed`, `batch_loss` (λ and fusion positions of jobs/configs/tiny_cpu.yaml), backward,
AdamW. Unpacked, a micro-batch is `micro` conversations padded to the longest; packed, `micro`
packed rows of up to `max_length` tokens (as the loop packs a window: `order.fill_order`, then
next fit, `order.pack`, each block of rows a window). A control trains
unpacked micro-batches of as many conversations as the packed rows hold (the same rows per step:
what is left is the padding). The variants train on the same conversations, in blocks that
alternate between them (so a slower or faster stretch of
this shared machine falls on both), from the same initial weights; the figure is the real tokens
of every step over the summed step times.

Usage: python bench/train_packing.py [--rows 512] [--model pivot|wide] [--threads 2]
The last line is one JSON object with `packing_tokens_per_s_ratio`.
`packing_case(...)` returns the same figures as a dict, for a caller such as bench/train_memory.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch

LAMBDA, POSITIONS, K = 0.7, "transferred", 10  # jobs/configs/tiny_cpu.yaml's train settings; collect.top_k


def fused_rows(path: str, n: int) -> list[dict]:
    """Up to n rows of a finished fused dataset (FUSED schema), in file order."""
    from fusion_ray import io
    from fusion_ray.arrays import rows_of

    rows: list[dict] = []
    for f in io.list_files(path):
        rows += rows_of(io.read_table(f))
        if len(rows) >= n:
            break
    return rows[:n]


def corpus_rows(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """n conversations of the demo chat corpus as fused-like rows (pivot tokens, reply mask, a teacher)."""
    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.chat_template import RowRejected, prepare_row
    from fusion_ray.demo.builds import ensure_assets
    from fusion_ray.engines.topk import loss_mask

    root = ensure_assets(log=lambda *_: None)
    tok = tokenizers.from_dir(root / "models" / "pivot")
    rng = np.random.default_rng(seed)
    vocab = len(tok)
    streams = [open(root / "corpus" / f"{d}_train.jsonl") for d in ("computing", "english")]
    rows: list[dict] = []
    try:
        while len(rows) < n:
            line = streams[len(rows) % 2].readline()
            try:
                prep = prepare_row(json.loads(line), tok, max_length=max_length)
            except RowRejected:
                continue
            enc = tok(prep.text, return_offsets_mapping=True, add_special_tokens=False)
            ids, offsets = np.asarray(enc["input_ids"]), np.asarray(enc["offset_mapping"])
            mask = loss_mask(offsets, prep.span_starts, prep.span_ends)
            scored = int(mask.sum())
            probs = np.sort(rng.dirichlet(np.full(K + 1, 0.5), scored), axis=-1)[:, ::-1][:, :K]
            rows.append({"input_ids": ids, "loss_mask": mask,
                         "topk_ids": rng.integers(0, vocab, (scored, K)),
                         "topk_logprobs": np.log(probs).astype(np.float16),
                         "transferred": rng.random(scored) < 0.65})
    finally:
        for s in streams:
            s.close()
    return rows


def find_fused(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = sorted(p for p in glob.glob("runs/tiny_cpu/fused/*") if Path(p, "_manifest.json").is_file())
    return found[0] if found else None


def make_model(kind: str, pivot: str, vocab: int):
    """`pivot`: the demo pivot itself (Qwen2, 0.9 M parameters); `wide`: a Qwen2 of its vocabulary
    with hidden 512 × 4 layers (~14 M), where the step is compute- rather than overhead-bound."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "pivot":
        return AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=1536,
                                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=1024, tie_word_embeddings=True))


def packing_case(*, rows: int = 512, model: str = "pivot", micro: int = 8, max_length: int = 256,
                 blocks: int = 4, threads: int = 2, fused: str | None = None, seed: int = 0) -> dict:
    """Tokens/s of real text, packed vs unpacked, on the same rows; returns the figures as a dict."""
    import copy

    from transformers import AutoConfig

    from fusion_ray.demo.builds import ensure_assets
    from fusion_ray.trainer.batches import collate, collate_packed
    from fusion_ray.trainer.losses import batch_loss
    from fusion_ray.trainer.order import fill_order, pack

    torch.set_num_threads(threads)
    pivot = str(ensure_assets(log=lambda *_: None) / "models" / "pivot")
    source = find_fused(fused)
    data = fused_rows(source, rows) if source else corpus_rows(rows, max_length, seed)
    lengths = np.array([min(len(r["input_ids"]), max_length) for r in data])
    pivot_config = AutoConfig.from_pretrained(pivot)
    first = make_model(model, pivot, pivot_config.vocab_size)
    pad = int(pivot_config.pad_token_id)
    size = len(data) // blocks

    def packed(block: list[dict]) -> tuple[list[dict], np.ndarray]:
        """The block as the training loop packs a window: regrouped by `fill_order`, then next fit."""
        lens = np.array([min(len(r["input_ids"]), max_length) for r in block])
        order = fill_order(lens, max_length)
        return [block[i] for i in order], pack(lens[order], max_length)

    packed_rows = sum(int(packed(data[b * size:(b + 1) * size])[1][-1]) + 1 for b in range(blocks))
    # the control: unpacked with as many conversations per step as the packed rows hold (padding alone)
    same_rows = max(micro + 1, round(micro * len(data) / packed_rows))
    variants = {"unpacked": micro, "packed": micro, "unpacked_same_rows": same_rows}
    models = {name: (m := copy.deepcopy(first).train(), torch.optim.AdamW(m.parameters(), lr=1e-4))
              for name in variants}

    def steps(name: str, block: list[dict]) -> tuple[int, float, int]:
        """Train on `block` one micro-batch at a time; (real tokens, seconds, micro-batches)."""
        size = variants[name]
        if name == "packed":
            block, group = packed(block)
            batches = [collate_packed([r for r, g in zip(block, group, strict=True) if lo <= g < lo + size],
                                      pad, max_length) for lo in range(0, int(group[-1]) + 1, size)]
        else:
            batches = [collate(block[i:i + size], pad, max_length) for i in range(0, len(block), size)]
        net, opt = models[name]
        tokens, seconds = 0, 0.0
        for batch in batches:  # the collate is inside the loop's step too, but cheap: time the step only
            t0 = time.perf_counter()
            out = batch_loss(net, batch, lam=LAMBDA, tail="bucket", temperature=1.0, fusion_positions=POSITIONS)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
        return tokens, seconds, len(batches)

    for name in variants:  # warm-up
        steps(name, data[: 2 * same_rows])
    totals = {name: [0, 0.0, 0] for name in variants}  # real tokens, seconds, micro-batches
    for b in range(blocks):
        block = data[b * size:(b + 1) * size]
        names = list(variants)
        for name in names[b % len(names):] + names[:b % len(names)]:  # each block starts with another variant
            tokens, seconds, n = steps(name, block)
            totals[name][0] += tokens
            totals[name][1] += seconds
            totals[name][2] += n
    tps = {name: t[0] / t[1] for name, t in totals.items()}

    def fill(n: int) -> float:
        return float(lengths.sum() / sum(max(lengths[i:i + n]) * len(lengths[i:i + n])
                                         for i in range(0, len(lengths), n)))

    return {
        "packing_tokens_per_s_ratio": tps["packed"] / tps["unpacked"],
        "packing_tokens_per_s_ratio_same_rows_per_step": tps["packed"] / tps["unpacked_same_rows"],
        "packed_tokens_per_s": tps["packed"], "unpacked_tokens_per_s": tps["unpacked"],
        "unpacked_same_rows_tokens_per_s": tps["unpacked_same_rows"], "same_rows_micro_batch": same_rows,
        "rows": len(data), "rows_from": source or "demo chat corpus (pivot tokenizer)", "model": model,
        "parameters": sum(p.numel() for p in first.parameters()), "micro_batch_size": micro,
        "max_length": max_length, "mean_row_tokens": float(lengths.mean()),
        "rows_per_packed_row": len(data) / packed_rows,
        "packed_fill": float(lengths[: blocks * size].sum() / (packed_rows * max_length)),
        "unpacked_fill": fill(micro), "unpacked_same_rows_fill": fill(same_rows),
        "micro_steps": {name: t[2] for name, t in totals.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--model", choices=("pivot", "wide"), default="pivot")
    ap.add_argument("--micro", type=int, default=8, help="micro_batch_size (tiny_cpu.yaml: 8)")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length (tiny_cpu.yaml: 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused", help="a finished fused/<pair>/ dir to take the rows from")
    args = ap.parse_args()
    r = packing_case(rows=args.rows, model=args.model, micro=args.micro, max_length=args.max_length,
                     threads=args.threads, fused=args.fused)
    print(f"rows: {r['rows']} from {r['rows_from']}, {r['mean_row_tokens']:.1f} tokens on average; "
          f"model {r['model']} ({r['parameters'] / 1e6:.2f} M parameters); micro-batch {r['micro_batch_size']}, "
          f"max_length {r['max_length']}")
    print(f"fill (real / computed tokens): unpacked {r['unpacked_fill']:.2f}, packed {r['packed_fill']:.2f} "
          f"({r['rows_per_packed_row']:.1f} conversations per packed row); micro-steps {r['micro_steps']}")
    print(f"real tokens/s: unpacked {r['unpacked_tokens_per_s']:.0f}, packed {r['packed_tokens_per_s']:.0f}, "
          f"ratio {r['packing_tokens_per_s_ratio']:.2f} (same micro_batch_size)")
    print(f"control, unpacked micro-batches of {r['same_rows_micro_batch']} conversations (as many as the packed "
          f"rows hold; fill {r['unpacked_same_rows_fill']:.2f}): {r['unpacked_same_rows_tokens_per_s']:.0f} "
          f"tokens/s; packed / it {r['packing_tokens_per_s_ratio_same_rows_per_step']:.2f}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
