"""Benchmark the collect stage's engines and storage against FuseChat-style baselines.

(a) tokens/s of our `hf` engine (length-bucketed, no padding waste) vs a FuseChat-style
    loop that pads every example to the max length in fixed batches — same model, rows;
(b) storage at k=10 vs the FuseChat layout (fp16 logits + int64 ids at every position,
    padded to 2048: 100 B per position): bytes per real token and per stored position;
(c) tokens/s of our `vllm` engine vs our `hf` engine on this CPU.

Runs on the demo's pivot and held-out + training rows (`fusion-ray demo` builds them).
Usage: python bench/collect.py [--rows 512] [--k 10]
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fusion_ray.chat_template import prepare_row
from fusion_ray.collect.stage import rows_to_table
from fusion_ray.demo import assets, scheme
from fusion_ray.engines import scoring as engines
from fusion_ray.engines.topk import logits_row

REFERENCE_LEN = 2048
REFERENCE_BYTES_PER_POSITION = 10 * 2 + 10 * 8  # fp16 values + int64 ids, k = 10


def load_rows(n: int, tokenizer, max_length: int) -> list:
    rows = []
    for name in ("computing_train", "english_train"):
        with open(assets.asset_path(name)) as fh:
            for line in fh:
                rows.append(prepare_row(json.loads(line), tokenizer, max_length=max_length))
                if len(rows) % (n // 2) == 0:
                    break
    return rows


@torch.inference_mode()
def padded_baseline(model, seqs: list[list[int]], k: int, pad_to: int, batch: int, pad_id: int) -> float:
    """FuseChat-style: fixed batches, every row padded to `pad_to`, top-k at every position."""
    started = time.perf_counter()
    for lo in range(0, len(seqs), batch):
        chunk = seqs[lo:lo + batch]
        ids = torch.full((len(chunk), pad_to), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], attn[i, :len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        torch.log_softmax(logits, -1).topk(k, dim=-1)
    return time.perf_counter() - started


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def storage(rows, enc, scored, k: int) -> dict:
    table = rows_to_table([
        logits_row("x", r.text, ids, np.asarray(off).reshape(-1, 2), r.span_starts, r.span_ends, sc,
                   scored_only=False)
        for r, ids, off, sc in zip(rows, enc["input_ids"], enc["offset_mapping"], scored, strict=True)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.parquet"
        pq.write_table(table, path, compression="zstd")
        ours = path.stat().st_size
    tokens = sum(len(i) for i in enc["input_ids"])
    positions = tokens - len(rows)
    reference = len(rows) * REFERENCE_LEN * REFERENCE_BYTES_PER_POSITION
    return {"ours_bytes": ours, "tokens": tokens, "positions": positions,
            "ours_per_token": ours / tokens, "reference_per_token": reference / tokens,
            "ours_per_position": ours / positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=256, help="the tiny config's max_length")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from fusion_ray import tokenizer as tokenizers

    model_dir = str(scheme.resolve("demo:pivot"))
    tok = tokenizers.from_dir(model_dir)
    rows = load_rows(args.rows, tok, args.max_length)
    enc = tok([r.text for r in rows], return_offsets_mapping=True)
    seqs = enc["input_ids"]
    tokens = sum(len(s) for s in seqs)
    print(f"rows {len(rows)}, real tokens {tokens}, mean length {tokens / len(rows):.1f}, k={args.k}")

    hf = engines.HFEngine(model_dir, dtype="float32", max_rows=args.batch)
    hf.score(seqs[:8], args.k)  # warm-up
    t_base = padded_baseline(hf.model, seqs, args.k, args.max_length, args.batch, tok.pad_token_id)
    t_hf, scored = timed(lambda: hf.score(seqs, args.k))
    print(f"(a) padded fixed batches (pad to {args.max_length}): {tokens / t_base:9.0f} real tokens/s")
    print(f"    ours, hf engine (length-bucketed):      {tokens / t_hf:9.0f} real tokens/s "
          f"→ {t_base / t_hf:.2f}×")

    s = storage(rows, enc, scored, args.k)
    print(f"(b) reference layout: {REFERENCE_BYTES_PER_POSITION} B/position × {REFERENCE_LEN} padded "
          f"= {s['reference_per_token']:.0f} B per real token")
    print(f"    ours (Parquet, zstd): {s['ours_per_token']:.1f} B per real token "
          f"({s['ours_per_token'] / s['reference_per_token']:.4f}×), "
          f"{s['ours_per_position']:.1f} B per stored position "
          f"({s['ours_per_position'] / REFERENCE_BYTES_PER_POSITION:.3f}×)")

    vllm_engine = engines.VLLMEngine(model_dir, k=args.k, dtype="float32", max_model_len=2 * args.max_length)
    vllm_engine.score(seqs[:8], args.k)  # warm-up
    t_vllm, scored_v = timed(lambda: vllm_engine.score(seqs, args.k))
    same = np.concatenate([(a[0] == b[0]).all(1) for a, b in zip(scored, scored_v, strict=True)])
    gap = max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(scored, scored_v, strict=True))
    print(f"(c) vllm engine: {tokens / t_vllm:9.0f} real tokens/s vs hf {tokens / t_hf:9.0f} "
          f"→ {t_hf / t_vllm:.2f}×; identical top-k at {same.mean():.4%} of positions, "
          f"max |Δ gold log-prob| {gap:.1e}")
    vllm_engine.close()
    print(json.dumps({
        "hf_vs_padded_speedup": round(t_base / t_hf, 3),
        "bytes_per_token_ratio": round(s["ours_per_token"] / s["reference_per_token"], 5),
        "bytes_per_position_ratio": round(s["ours_per_position"] / REFERENCE_BYTES_PER_POSITION, 4),
        "vllm_vs_hf_speedup": round(t_hf / t_vllm, 3),
    }))


if __name__ == "__main__":
    main()
