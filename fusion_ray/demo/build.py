"""Build the embedded default: corpus, tokenizers, and three tiny trained chat models.

Each model is a real transformers model (Qwen2, GPT-2, Mistral) with a real cut-down
tokenizer, trained briefly with plain torch on its domain mix, saved atomically as
an HF model dir (safetensors, config, tokenizer, chat template). Sources are
specialists (mostly one domain, more steps); the pivot is a weaker generalist.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from fusion_ray.demo.assets import CORPUS_FILES, DemoSpec, TinyModel, build_precision, training_autocast
from fusion_ray.demo.corpus import DOMAINS, build_corpus
from fusion_ray.demo.tokenizers import build_tokenizer
from fusion_ray.evaluate.bpb import assistant_span, bits_per_byte, score_spans


def build_all(spec: DemoSpec, root: Path, log=print) -> dict:
    """Build every missing part below `root`; return a summary (sizes, times, bpb)."""
    corpus = build_corpus_once(spec, root / "corpus", log)
    rows = {name: read_jsonl(corpus / f"{name}.jsonl") for name in CORPUS_FILES}
    summary: dict = {"spec_key": spec.key(), "precision": build_precision(), "corpus": {}, "models": {}}
    log(f"[demo] training precision: {summary['precision']} (FUSION_RAY_DEMO_PRECISION overrides)")
    for name, items in rows.items():
        path = corpus / f"{name}.jsonl"
        summary["corpus"][name] = {"rows": len(items), "bytes": path.stat().st_size}
    for model in spec.models:
        summary["models"][model.name] = build_model_once(spec, model, rows, root / "models", log)
    return summary


def build_corpus_once(spec: DemoSpec, out: Path, log=print) -> Path:
    if out.exists():
        return out
    started = time.monotonic()
    tmp = out.with_name(f"{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = build_corpus(tmp, seed=spec.seed, heldout_per_domain=spec.heldout_per_domain,
                          max_per_domain=spec.max_per_domain)
    os.replace(tmp, out)
    log(f"[demo] corpus built in {time.monotonic() - started:.1f}s: {counts}")
    return out


def build_model_once(spec: DemoSpec, model: TinyModel, rows: dict, out_root: Path, log=print) -> dict:
    """Train and save one tiny model unless its directory exists; return its card."""
    out = out_root / model.name
    card_path = out / "demo_card.json"
    if card_path.exists():
        return json.loads(card_path.read_text())
    started = time.monotonic()
    tmp = out_root / f"{model.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(model.tokenizer, model.vocab_size, tmp)
    torch.manual_seed(spec.seed)
    net = make_model(model, tokenizer)
    data = packed_batches(spec, model, rows, tokenizer)
    losses = train(net, data, model, spec, log)
    net.save_pretrained(tmp)
    card = {
        "name": model.name, "architecture": model.architecture, "tokenizer": model.tokenizer,
        "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in net.parameters()),
        "steps": model.steps, "mix": dict(model.mix), "final_loss": round(losses[-1], 4),
        "heldout_bpb": heldout_bpb(net, tokenizer, rows),
        "build_seconds": round(time.monotonic() - started, 1),
        "bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
    }
    (tmp / "demo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    out_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"[demo] {model.name}: {card['parameters']:,} params, bpb {card['heldout_bpb']}, "
        f"{card['build_seconds']}s")
    return card


def make_model(model: TinyModel, tokenizer):
    """A freshly initialised transformers causal LM of the model's architecture."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if model.architecture == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=model.hidden, n_layer=model.layers,
                         n_head=model.heads, n_inner=model.intermediate, n_positions=1024, **ids)
        return GPT2LMHeadModel(cfg)
    common = dict(vocab_size=len(tokenizer), hidden_size=model.hidden,
                  num_hidden_layers=model.layers, num_attention_heads=model.heads,
                  num_key_value_heads=model.kv_heads, intermediate_size=model.intermediate,
                  max_position_embeddings=1024, tie_word_embeddings=True, **ids)
    if model.architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if model.architecture == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    raise ValueError(f"unknown demo architecture {model.architecture!r}")


def packed_batches(spec: DemoSpec, model: TinyModel, rows: dict, tokenizer) -> torch.Tensor:
    """Token ids [steps × batch, seq_len] drawn from the model's domain mix, rows shuffled."""
    rng = random.Random(f"{spec.seed}-{model.name}")
    need = model.steps * spec.batch_size * spec.seq_len
    docs: list[list[int]] = []
    for domain, share in model.mix:
        pool = rows[f"{domain}_train"]
        order = list(range(len(pool)))
        rng.shuffle(order)
        got, i = 0, 0
        while got < share * need and order:
            chunk = [pool[order[j % len(order)]] for j in range(i, i + 256)]
            texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chunk]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                docs.append(ids)
                got += len(ids)
            i += 256
    rng.shuffle(docs)
    flat = torch.tensor([t for d in docs for t in d][: need], dtype=torch.long)
    return flat.view(-1, spec.seq_len)


def train(net, data: torch.Tensor, model: TinyModel, spec: DemoSpec, log=print) -> list[float]:
    """AdamW, cosine schedule with 5% warmup, bf16 autocast where the CPU has native bf16
    (`build_precision`); returns per-step losses."""
    opt = torch.optim.AdamW(net.parameters(), lr=model.lr, weight_decay=0.01)
    warmup = max(1, model.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, model.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    net.train()
    losses = []
    autocast = training_autocast()
    for step in range(model.steps):
        batch = data[step * spec.batch_size : (step + 1) * spec.batch_size]
        with autocast:
            loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == model.steps - 1:
            log(f"[demo] {model.name} step {step + 1}/{model.steps} loss {losses[-1]:.3f}")
    return losses


def heldout_bpb(net, tokenizer, rows: dict) -> dict[str, float]:
    """Held-out bits per byte of the assistant replies, per domain."""
    out = {}
    for domain in DOMAINS:
        spans = [assistant_span(tokenizer, r["messages"]) for r in rows[f"{domain}_heldout"]]
        nll, n_bytes = score_spans(net, tokenizer, [t for t, _ in spans], [s for _, s in spans])
        out[domain] = round(bits_per_byte(nll, n_bytes), 4)
    return out


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file (the demo's own corpus files: small, trusted)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
