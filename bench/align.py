"""Benchmark token alignment against the plain-Python DTW of the reference.

On real sequence pairs from the demo corpus (pivot: cut DeepSeek-V3 tokenizer; sources:
cut GPT-2 and cut Mistral tokenizers), times:
  (a) our default aligner (offsets, DTW only where offsets do not meet) vs plain DTW;
  (b) our compiled DTW alone vs plain DTW, checking the outputs are identical;
  (c) the span transfer (`spans.transfer_spans`, `align.positions: spans`) on those pairs,
      with synthetic top-k rows (distinct ids, the gold token first in 70% of them);
and prints how often offset alignment and DTW agree (same source tokens per pivot
token). Also times the `mined` vocabulary map between the FULL GPT-2 (50k) and
Mistral (32k) vocabularies. Usage: python bench/align.py [--pairs 150]
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

from fusion_ray.align import dtw, offsets, project, vocab
from fusion_ray.demo import assets, scheme


def load_pairs(n: int):
    from fusion_ray import tokenizer as tokenizers

    pivot = tokenizers.from_dir(scheme.resolve("demo:pivot"))
    pairs = []
    for source_name in ("source_computing", "source_english"):
        source = tokenizers.from_dir(scheme.resolve(f"demo:{source_name}"))
        corpus = "computing_train" if source_name.endswith("computing") else "english_train"
        with open(assets.asset_path(corpus)) as fh:
            for line, _ in zip(fh, range(n // 2), strict=False):
                text = pivot.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                enc = [t(text, return_offsets_mapping=True) for t in (pivot, source)]
                pairs.append({
                    "text_len": len(text),
                    "p_ends": np.array([e for _, e in enc[0]["offset_mapping"]]),
                    "s_ends": np.array([e for _, e in enc[1]["offset_mapping"]]),
                    "p_tok": pivot.convert_ids_to_tokens(enc[0]["input_ids"]),
                    "s_tok": source.convert_ids_to_tokens(enc[1]["input_ids"]),
                    "s_marker": vocab.space_marker(source)})
    return pairs


def timed(fn, pairs, repeat: int = 1) -> tuple[float, list]:
    """Seconds per pass over `pairs`, with the cyclic GC paused for both sides alike
    (its pauses over the loaded tokenizers otherwise swing timings several-fold)."""
    out = [fn(p) for p in pairs[:2]]  # warm-up (numba compile, caches)
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(repeat):
            out = [fn(p) for p in pairs]
        return (time.perf_counter() - started) / repeat, out
    finally:
        gc.enable()


def spans_samples(n: int, k: int = 10, seed: int = 0) -> list[tuple]:
    """(pivot row, source row, text, first-piece map, FirstPiece, source surfaces) of real demo texts
    whose offsets meet, as `align` passes them to `spans.transfer_spans`; the top-k rows are
    synthetic (seeded), with the gold token first in 70% of them."""
    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.align import spans

    rng = np.random.default_rng(seed)
    pivot = tokenizers.from_dir(scheme.resolve("demo:pivot"))
    first = spans.FirstPiece(pivot, vocab.surfaces(pivot))

    def row(tok, text: str, vocab_size: int) -> dict:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.array(enc["input_ids"])
        draw = rng.random((len(ids) - 1, vocab_size))
        draw[np.arange(len(ids) - 1), ids[1:]] = 2.0  # the gold token is never among the k drawn
        topk = np.argpartition(draw, k, axis=1)[:, :k]  # k distinct ids per row, as a real top-k
        topk[:, 0] = np.where(rng.random(len(ids) - 1) < 0.7, ids[1:], topk[:, 0])
        logprobs = np.log(np.sort(rng.dirichlet(np.ones(k + 1), len(ids) - 1)[:, :k], axis=1)[:, ::-1])
        return {"input_ids": ids, "offsets": np.array([e for _, e in enc["offset_mapping"]]),
                "loss_mask": np.ones(len(ids) - 1, bool), "topk_ids": topk,
                "topk_logprobs": logprobs.astype(np.float32), "gold_logprob": logprobs[:, -1].astype(np.float32)}

    samples = []
    for source_name in ("source_computing", "source_english"):
        source = tokenizers.from_dir(scheme.resolve(f"demo:{source_name}"))
        s_surf = vocab.surfaces(source)
        vmap = first.vocab_map(s_surf, {})
        corpus = "computing_train" if source_name.endswith("computing") else "english_train"
        with open(assets.asset_path(corpus)) as fh:
            for line, _ in zip(fh, range(n // 2), strict=False):
                text = pivot.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                p_row, s_row = row(pivot, text, len(pivot)), row(source, text, len(source))
                if offsets.meet(p_row["offsets"], s_row["offsets"], len(text)):
                    samples.append((p_row, s_row, text, vmap, first, s_surf))
    return samples


def full_tokenizer(family: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from fusion_ray.demo.tokenizers import original_spec

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(original_spec(family))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=150)
    args = parser.parse_args()
    pairs = load_pairs(args.pairs)
    cells = sum(len(p["p_tok"]) * len(p["s_tok"]) for p in pairs)
    print(f"{len(pairs)} real sequence pairs, {cells:,} DTW cells "
          f"(mean {np.mean([len(p['p_tok']) for p in pairs]):.0f} pivot × "
          f"{np.mean([len(p['s_tok']) for p in pairs]):.0f} source tokens)")

    def reference(p):
        return dtw.dtw_align_reference(p["s_tok"], p["p_tok"], source_marker=p["s_marker"], pivot_marker="Ġ")[0]

    def ours_dtw(p):
        return dtw.dtw_align(p["s_tok"], p["p_tok"], source_marker=p["s_marker"], pivot_marker="Ġ")

    def ours_default(p):
        return project.align_positions(p["p_ends"], p["s_ends"], p["text_len"], lambda: ours_dtw(p))

    t_def, def_out = timed(ours_default, pairs, repeat=20)
    t_dtw, dtw_out = timed(ours_dtw, pairs, repeat=3)
    t_ref, ref_out = timed(reference, pairs)
    identical = all(a == b for a, b in zip(ref_out, dtw_out, strict=True))
    used_dtw = sum(method == "dtw" for _, method in def_out)
    print(f"plain-Python DTW (reference):   {t_ref * 1e3 / len(pairs):9.3f} ms/pair "
          f"({t_ref / cells * 1e6:.2f} µs/cell)")
    print(f"(a) ours, offsets + fallback:   {t_def * 1e3 / len(pairs):9.3f} ms/pair → {t_ref / t_def:,.0f}× "
          f"(DTW fallback used on {used_dtw} of {len(pairs)} pairs)")
    print(f"(b) ours, compiled DTW alone:   {t_dtw * 1e3 / len(pairs):9.3f} ms/pair → {t_ref / t_dtw:,.0f}× "
          f"(outputs identical to the reference: {identical})")

    agree = total = one_to_one_agree = one_to_one_total = 0
    for p, d in zip(pairs, dtw_out, strict=True):
        o = offsets.pivot_to_source(p["p_ends"], p["s_ends"])
        agree += sum(a == b for a, b in zip(o, d, strict=True))
        total += len(o)
        o11 = offsets.one_to_one(p["p_ends"], p["s_ends"])
        d11 = project.one_to_one_from_groups(d, len(p["s_tok"]))
        one_to_one_total += int((o11 >= 0).sum())
        one_to_one_agree += int(((o11 >= 0) & (o11 == d11)).sum())
    agreement = agree / total
    print(f"offset alignment vs DTW: same source tokens for {agreement:.1%} of pivot tokens; "
          f"DTW finds {one_to_one_agree / max(one_to_one_total, 1):.1%} of the exact 1-1 pairs")

    from fusion_ray.align import spans

    samples = spans_samples(args.pairs)
    t_spans, _ = timed(lambda a: spans.transfer_spans(*a, k=10), samples, repeat=3)
    print(f"(c) span transfer:              {t_spans * 1e3 / len(samples):9.3f} ms/pair "
          f"({len(samples)} pairs whose offsets meet)")

    gpt, mistral = full_tokenizer("gpt2"), full_tokenizer("mistral")
    started = time.perf_counter()
    mined = vocab.mined_map(vocab.surfaces(gpt), vocab.surfaces(mistral))
    t_mined = time.perf_counter() - started
    exact = int((vocab.exact_map(vocab.surfaces(gpt), vocab.surfaces(mistral)) >= 0).sum())
    print(f"mined map GPT-2 ({len(gpt):,}) → Mistral ({len(mistral):,}): {t_mined:.1f} s "
          f"({exact:,} exact hits, {len(mined) - exact:,} by edit distance)")
    print(json.dumps({"aligner_speedup": round(t_ref / t_def, 1), "dtw_speedup": round(t_ref / t_dtw, 1),
                      "offset_dtw_agreement": round(agreement, 4), "mined_map_seconds": round(t_mined, 2),
                      "spans_ms_per_pair": round(t_spans * 1e3 / len(samples), 3)}))


if __name__ == "__main__":
    main()
