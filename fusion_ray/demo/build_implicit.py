"""Build the implicit-fusion default: prompts, four tiny chat models, a tiny reward model.

Models are trained with plain torch on (prompt, response) chats rendered with their own chat
template, the loss on the response only. Each part is published atomically; a model's card
(`demo_card.json`) records its held-out accuracy per operation, greedy and sampled at the sample
stage's default temperature, measured with `math_correct` on `arith_heldout` prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from fusion_ray.demo import arith
from fusion_ray.demo.assets import TinyModel, build_precision, training_autocast
from fusion_ray.demo.build import make_model, read_jsonl
from fusion_ray.demo.corpus import DOMAINS, _write_jsonl, build_corpus, rows_past
from fusion_ray.demo.implicit import ImplicitSpec
from fusion_ray.demo.tokenizers import build_tokenizer


def build_all(spec: ImplicitSpec, root: Path, log=print) -> dict:
    """Build every missing part below `root`; return the summary written to build.json."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    corpus = build_corpus_once(spec, root / "corpus", log)
    chat = {name: read_jsonl(corpus / "chat" / f"{name}.jsonl") for name in ("train", "heldout", "judge")}
    heldout = read_jsonl(corpus / "arith_heldout.jsonl")
    summary: dict = {"spec_key": spec.key(), "precision": build_precision(), "corpus": {}, "models": {}}
    log(f"[demo-implicit] training precision: {summary['precision']} (FUSION_RAY_DEMO_PRECISION overrides)")
    for path in sorted(corpus.glob("*.jsonl")):
        summary["corpus"][path.stem] = {"rows": sum(1 for _ in open(path)), "bytes": path.stat().st_size}
    for model in spec.models:
        summary["models"][model.name] = build_model_once(spec, model, chat["train"], heldout, root / "models", log)
    summary["models"][spec.reward.name] = build_reward_once(spec, spec.reward, chat, root / "models", log)
    summary["models"][spec.judge.name] = build_judge_once(spec, spec.judge, chat, root / "models", log)
    return summary


# --- prompts ---------------------------------------------------------------------------------


def build_corpus_once(spec: ImplicitSpec, out: Path, log=print) -> Path:
    """arith_train/heldout, open_train/heldout, and the chat rows below chat/ (train, heldout, and
    the judge's own rows, `judge`: past both in the dictionaries' seeded stream)."""
    if out.exists():
        return out
    started = time.monotonic()
    tmp = out.with_name(f"{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "chat").mkdir(parents=True)
    train, heldout = arith.prompt_sets(spec.seed, spec.train_per_op, spec.heldout_per_op)
    _write_jsonl(tmp / "arith_train.jsonl", train)
    _write_jsonl(tmp / "arith_heldout.jsonl", heldout)
    dicts = tmp / "dicts"
    build_corpus(dicts, seed=spec.seed, heldout_per_domain=spec.chat_heldout, max_per_domain=spec.chat_rows,
                 max_words=spec.chat_words)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    open_rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    wanted = {"train": spec.open_train // len(DOMAINS), "heldout": spec.open_heldout // len(DOMAINS)}
    for domain in DOMAINS:
        for split in ("train", "heldout"):
            rows = read_jsonl(dicts / f"{domain}_{split}.jsonl")
            # The open prompts: the first rows' questions (train ones are kept out of the models' chat data).
            for r in rows[: wanted[split]]:
                open_rows[split].append({"id": f"open-{r['id']}", "prompt": r["messages"][0]["content"],
                                         "domain": domain})
            splits[split] += rows[wanted[split]:] if split == "train" else rows
    shutil.rmtree(dicts)
    splits["judge"] = [r for domain in DOMAINS for r in rows_past(
        domain, seed=spec.seed, skip=spec.chat_heldout + spec.chat_rows, count=spec.judge_rows, max_words=spec.chat_words)]
    for split in ("train", "heldout", "judge"):
        random.Random(f"{spec.seed}:chat:{split}").shuffle(splits[split])
        _write_jsonl(tmp / "chat" / f"{split}.jsonl", splits[split])
    for split in ("train", "heldout"):
        _write_jsonl(tmp / f"open_{split}.jsonl", open_rows[split])
    os.replace(tmp, out)
    log(f"[demo-implicit] prompts built in {time.monotonic() - started:.1f}s: {len(train)} arith train, "
        f"{len(heldout)} arith held-out, {len(open_rows['train'])} + {len(open_rows['heldout'])} open")
    return out


# --- training --------------------------------------------------------------------------------


def encode_chat(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], int]:
    """(token ids of the whole chat, where the response starts), cut at `max_len` tokens."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(head)
    h = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = h + tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    return ids[:max_len], len(h)


def example_pools(spec: ImplicitSpec, tokenizer, chat_train: list[dict]) -> dict[str, list[tuple[list[int], int]]]:
    """Encoded (ids, response start) per training part: each op's training facts, and chat rows."""
    pools = {op: [encode_chat(tokenizer, p, r, spec.max_len) for p, r in arith.training_examples(op, spec.seed)]
             for op in arith.OPS}
    pools["chat"] = [encode_chat(tokenizer, r["messages"][0]["content"], r["messages"][1]["content"], spec.max_len)
                     for r in chat_train]
    return pools


def _pad(chosen: list[tuple[list[int], int]], pad: int):
    width = max(len(ids) for ids, _ in chosen)
    ids = torch.full((len(chosen), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (seq, start) in enumerate(chosen):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return ids, attn, labels


def batches(spec: ImplicitSpec, model: TinyModel, pools: dict, pad: int):
    """`model.steps` batches drawn from the model's mix, each a list of (input ids, attention mask,
    labels) groups: arithmetic and chat apart, so that short rows are not padded to long ones."""
    rng = random.Random(f"{spec.seed}-{model.name}")
    counts = {part: round(share * spec.batch_size) for part, share in model.mix}
    orders: dict[str, list[int]] = {part: [] for part in counts}
    for _ in range(model.steps):
        groups: dict[bool, list] = {False: [], True: []}
        for part, k in counts.items():
            for _ in range(k):
                if not orders[part]:
                    orders[part] = list(range(len(pools[part])))
                    rng.shuffle(orders[part])
                groups[part == "chat"].append(pools[part][orders[part].pop()])
        yield [_pad(g, pad) for g in groups.values() if g]


def optimizer(net, model: TinyModel):
    opt = torch.optim.AdamW(net.parameters(), lr=model.lr, weight_decay=0.01)
    warmup = max(1, model.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, model.steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_lm(net, spec: ImplicitSpec, model: TinyModel, pools: dict, pad: int, log=print) -> list[float]:
    """AdamW, cosine schedule with 5% warmup, bf16 autocast where native (`build_precision`), loss on
    responses only."""
    opt, sched = optimizer(net, model)
    net.train()
    losses = []
    autocast = training_autocast()
    for step, groups in enumerate(batches(spec, model, pools, pad)):
        n = [int((labels[:, 1:] != -100).sum()) for _, _, labels in groups]
        loss = 0.0
        for (ids, attn, labels), k in zip(groups, n, strict=True):  # the mean over all response tokens
            with autocast:
                part = net(input_ids=ids, attention_mask=attn, labels=labels).loss * (k / sum(n))
            part.backward()
            loss += part.detach()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == model.steps - 1:
            log(f"[demo-implicit] {model.name} step {step + 1}/{model.steps} loss {losses[-1]:.3f}")
    net.eval()
    return losses


# --- measuring ---------------------------------------------------------------------------------


@torch.no_grad()
def generate(net, tokenizer, prompts: list[str], *, samples: int, temperature: float, top_p: float,
             seed: int, max_new_tokens: int = 24, batch: int = 64) -> list[list[str]]:
    """`samples` responses per prompt (greedy when temperature is 0), left-padded batches."""
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch):
        chunk = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[i : i + batch]]
        seqs = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):] = torch.tensor(s)
            attn[j, width - len(s):] = 1
        greedy = temperature <= 0
        gen = net.generate(ids, attention_mask=attn, do_sample=not greedy, max_new_tokens=max_new_tokens,
                           temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                           top_k=None, num_return_sequences=1 if greedy else samples,
                           eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        per = 1 if greedy else samples
        out += [texts[j * per : (j + 1) * per] for j in range(len(seqs))]
    return out


def arith_accuracy(net, tokenizer, spec: ImplicitSpec, rows: list[dict], seed: int) -> dict:
    """Per op: greedy accuracy and sampled accuracy (`eval_samples` draws per prompt at the spec's
    temperature / top-p) on the first `eval_per_op` held-out prompts of each op."""
    from fusion_ray.reward.verify import math_correct

    out = {}
    for op in arith.OPS:
        chosen = [r for r in rows if r["op"] == op][: spec.eval_per_op]
        prompts = [r["prompt"] for r in chosen]
        greedy = generate(net, tokenizer, prompts, samples=1, temperature=0, top_p=1, seed=seed)
        drawn = generate(net, tokenizer, prompts, samples=spec.eval_samples, temperature=spec.temperature,
                         top_p=spec.top_p, seed=seed)
        ok_g = [math_correct(g[0], r["answer"]) for g, r in zip(greedy, chosen, strict=True)]
        ok_s = [[math_correct(s, r["answer"]) for s in d] for d, r in zip(drawn, chosen, strict=True)]
        out[op] = {"prompts": len(chosen), "greedy": round(sum(ok_g) / len(chosen), 4),
                   "sampled": round(sum(map(sum, ok_s)) / (len(chosen) * spec.eval_samples), 4),
                   "any_sampled": round(sum(map(any, ok_s)) / len(chosen), 4)}
    return out


# --- models ------------------------------------------------------------------------------------


def _publish(tmp: Path, out: Path, card: dict) -> dict:
    card["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    (tmp / "demo_card.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return card


def _card(out_root: Path, model: TinyModel) -> dict | None:
    """A built model's card, or None when it is still to build."""
    path = out_root / model.name / "demo_card.json"
    return json.loads(path.read_text()) if path.exists() else None


def _partial(out_root: Path, model: TinyModel, seed: int):
    """(its `.partial` dir, holding the model's tokenizer, and the tokenizer), torch seeded: where a
    build writes before `_publish`."""
    tmp = out_root / f"{model.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer(model.tokenizer, model.vocab_size, tmp)
    torch.manual_seed(seed)
    return tmp, tokenizer


def build_model_once(spec: ImplicitSpec, model: TinyModel, chat_train: list[dict], heldout: list[dict],
                     out_root: Path, log=print) -> dict:
    """Train and save one tiny chat model unless its directory exists; return its card."""
    if (card := _card(out_root, model)) is not None:
        return card
    out, started = out_root / model.name, time.monotonic()
    tmp, tokenizer = _partial(out_root, model, spec.seed)
    net = make_model(model, tokenizer)
    pools = example_pools(spec, tokenizer, chat_train)
    losses = train_lm(net, spec, model, pools, tokenizer.pad_token_id, log)
    train_seconds = time.monotonic() - started
    net.save_pretrained(tmp)
    measured = time.monotonic()
    accuracy = arith_accuracy(net, tokenizer, spec, heldout, spec.seed)
    log(f"[demo-implicit] {model.name}: trained in {train_seconds:.1f}s, "
        f"measured in {time.monotonic() - measured:.1f}s")
    card = {"name": model.name, "architecture": model.architecture, "tokenizer": model.tokenizer,
            "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in net.parameters()),
            "steps": model.steps, "mix": dict(model.mix), "final_loss": round(losses[-1], 4),
            "heldout_accuracy": accuracy, "train_seconds": round(train_seconds, 1),
            "build_seconds": round(time.monotonic() - started, 1)}
    _publish(tmp, out, card)
    acc = ", ".join(f"{op} {a['greedy']:.2f}/{a['sampled']:.2f}" for op, a in accuracy.items())
    log(f"[demo-implicit] {model.name}: {card['parameters']:,} params, held-out greedy/sampled {acc}, "
        f"{card['build_seconds']}s")
    return card


# --- the reward model ----------------------------------------------------------------------------

CORRUPTIONS = ("mismatched", "shuffled", "repeated")  # the reward model's kinds of bad answer
# the judge's: the reward model's and two it never saw
JUDGE_CORRUPTIONS = CORRUPTIONS + ("same_domain", "truncated")


def corrupt(answer: str, others: list[dict], rng: random.Random, kind: str, domain: str | None = None) -> str:
    """A wrong answer: another row's answer (`same_domain`: of a row of `domain`), the answer's words
    shuffled, its start repeated, or its first third alone (`truncated`)."""
    words = answer.split()
    if kind in ("mismatched", "same_domain"):
        pool = others if kind == "mismatched" else [r for r in others if r["domain"] == domain]
        while True:
            other = rng.choice(pool)["messages"][1]["content"]
            if other != answer:
                return other
    if kind == "truncated":
        return " ".join(words[: max(1, len(words) // 3)])
    if kind == "shuffled" and len(words) > 2:
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    head = " ".join(words[: max(2, len(words) // 4)])
    return " ".join([head] * 4)


def preference_pairs(rows: list[dict], seed: str, kinds: tuple[str, ...] = CORRUPTIONS
                     ) -> list[tuple[list[dict], list[dict], str]]:
    """(chosen chat, rejected chat, corruption kind): one pair per row, `kinds` in turn."""
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        kind = kinds[i % len(kinds)]
        user, answer = r["messages"][0], r["messages"][1]["content"]
        wrong = corrupt(answer, rows, rng, kind, r["domain"])
        pairs.append(([user, {"role": "assistant", "content": answer}],
                      [user, {"role": "assistant", "content": wrong}], kind))
    return pairs


def make_reward_model(model: TinyModel, tokenizer):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    if model.architecture != "qwen2":
        raise ValueError(f"the demo reward model is a qwen2, not {model.architecture!r}")
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=model.hidden, num_hidden_layers=model.layers,
                      num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
                      intermediate_size=model.intermediate, max_position_embeddings=1024, num_labels=1,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForSequenceClassification(cfg)


def _encode_pairs(tokenizer, pairs, max_len: int) -> list[tuple[list[int], list[int]]]:
    def enc(chat):
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_len:]

    return [(enc(c), enc(r)) for c, r, _ in pairs]


def train_reward(net, spec: ImplicitSpec, model: TinyModel, encoded, pad: int, log=print) -> list[float]:
    """Bradley–Terry: -log σ(r(chosen) - r(rejected)), AdamW with the LM's schedule."""
    import torch.nn.functional as F

    opt, sched = optimizer(net, model)
    rng = random.Random(f"{spec.seed}-{model.name}")
    order: list[int] = []
    half = spec.batch_size // 2
    net.train()
    losses = []
    autocast = training_autocast()
    for step in range(model.steps):
        chosen = []
        for _ in range(half):
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            chosen.append(encoded[order.pop()])
        seqs = [c for c, _ in chosen] + [r for _, r in chosen]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        with autocast:
            scores = net(input_ids=ids, attention_mask=attn).logits.float().reshape(-1)
        loss = -F.logsigmoid(scores[:half] - scores[half:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == model.steps - 1:
            log(f"[demo-implicit] {model.name} step {step + 1}/{model.steps} loss {losses[-1]:.3f}")
    net.eval()
    return losses


def pair_accuracy(path: Path, pairs, kinds: tuple[str, ...] = CORRUPTIONS) -> dict:
    """Share of pairs the saved reward model (through RewardScorer) scores chosen > rejected."""
    from fusion_ray.engines.reward_model import RewardScorer

    scorer = RewardScorer(str(path), dtype="float32", max_length=256, batch_size=32, device="cpu")
    chosen = scorer.score([c for c, _, _ in pairs])
    rejected = scorer.score([r for _, r, _ in pairs])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    out = {"pairs": len(pairs), "accuracy": round(sum(wins) / len(wins), 4)}
    for kind in kinds:
        ks = [w for w, (_, _, k) in zip(wins, pairs, strict=True) if k == kind]
        out[kind] = round(sum(ks) / max(1, len(ks)), 4)
    return out


def build_pair_model_once(spec: ImplicitSpec, model: TinyModel, rows: list[dict], heldout: list[dict],
                          out_root: Path, *, seed: int, tag: str, kinds: tuple[str, ...],
                          compare_with: Path | None = None, log=print) -> dict:
    """Train and save one Bradley–Terry pair model (the reward model, the judge) unless its
    directory exists: pairs of `kinds` from `rows`, initialised and drawn with `seed`. Its card
    holds its pair accuracy per kind on pairs of `heldout` rows, and `compare_with`'s (another
    pair model's dir) on the same pairs."""
    if (card := _card(out_root, model)) is not None:
        return card
    out, started = out_root / model.name, time.monotonic()
    tmp, tokenizer = _partial(out_root, model, seed)
    net = make_reward_model(model, tokenizer)
    train_pairs = preference_pairs(rows, f"{seed}:{tag}-train", kinds)
    losses = train_reward(net, dataclasses.replace(spec, seed=seed), model,
                          _encode_pairs(tokenizer, train_pairs, spec.max_len * 2), tokenizer.pad_token_id, log)
    net.save_pretrained(tmp, safe_serialization=True)
    heldout_pairs = preference_pairs(heldout, f"{seed}:{tag}-heldout", kinds)
    accuracy = pair_accuracy(tmp, heldout_pairs, kinds)
    card = {"name": model.name, "architecture": model.architecture, "tokenizer": model.tokenizer,
            "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in net.parameters()),
            "steps": model.steps, "seed": seed, "rows": len(rows), "final_loss": round(losses[-1], 4),
            "heldout_pairs": accuracy}
    if compare_with is not None:
        card[f"{compare_with.name}_on_these_pairs"] = pair_accuracy(compare_with, heldout_pairs, kinds)
    card["build_seconds"] = round(time.monotonic() - started, 1)
    _publish(tmp, out, card)
    log(f"[demo-implicit] {model.name}: {card['parameters']:,} params, held-out pair accuracy "
        f"{accuracy['accuracy']:.3f} {accuracy}"
        + (f" ({compare_with.name}: {card[f'{compare_with.name}_on_these_pairs']})" if compare_with else "")
        + f", {card['build_seconds']}s")
    return card


def build_reward_once(spec: ImplicitSpec, model: TinyModel, chat: dict, out_root: Path, log=print) -> dict:
    """The reward model that chooses the DPO pairs of open prompts: the chat training rows, the
    build's seed, the three kinds of `CORRUPTIONS`."""
    return build_pair_model_once(spec, model, chat["train"], chat["heldout"], out_root, seed=spec.seed, tag="rm",
                                 kinds=CORRUPTIONS, log=log)


def build_judge_once(spec: ImplicitSpec, model: TinyModel, chat: dict, out_root: Path, log=print) -> dict:
    """The independent judge: its own rows (`chat["judge"]`), seed (`judge_seed`) and tokenizer, and
    every kind of `JUDGE_CORRUPTIONS`; its card sets the reward model's accuracy on the same
    held-out pairs beside its own (the kinds that model never saw show what the judge adds)."""
    return build_pair_model_once(spec, model, chat["judge"], chat["heldout"], out_root, seed=spec.judge_seed,
                                 tag="judge", kinds=JUDGE_CORRUPTIONS, compare_with=out_root / spec.reward.name,
                                 log=log)
