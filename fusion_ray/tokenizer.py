"""Opening a model's tokenizer from its directory, as the checkpoint declares it.

transformers 5 picks the tokenizer class from `config.json`'s `model_type` when the
checkpoint's `tokenizer_config.json` names only the generic backend (`TokenizersBackend` /
`PreTrainedTokenizerFast`), and a model-specific class rebuilds its own pre-tokenizer: a
Qwen2-architecture model that ships a DeepSeek tokenizer then splits digits one by one, and one
that ships a SentencePiece tokenizer loses its spaces and newlines, though `tokenizer.json`
says otherwise. Every stage opens tokenizers here, so that what `tokenizer.json` says is what
runs, and all stages tokenize alike: `for_model` opens a configured model's tokenizer (its
`tokenizer` if set, else its `path`; `trust_remote_code` as the model says), `from_dir` a
local model dir's.

`surfaces` gives each token's surface: the bytes it stands for (byte-level `Ġ`/`Ċ` symbols
decoded, SentencePiece `▁` → space and `<0xNN>` → the byte), as a latin-1 string so that every
byte is one character (alignment compares tokens by it; collect's hidden-state engine names
tokens by it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

GENERIC = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def declared_class(path: str | Path) -> str | None:
    """`tokenizer_class` of the dir's tokenizer_config.json (None when absent or unreadable)."""
    try:
        cfg = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("tokenizer_class") if isinstance(cfg, dict) else None


def from_dir(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local model dir: the generic fast tokenizer over `tokenizer.json`
    where the checkpoint declares that class, else what `AutoTokenizer` chooses."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if declared_class(path) in GENERIC and (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def for_model(model) -> Any:
    """The tokenizer of a configured model (`ModelSpec`): its `tokenizer` when set, else its
    `path` (a hub id or store URI is copied to this node once), with its `trust_remote_code`.

    Raises:
        ValueError: naming the model and the path when the tokenizer does not load.
    """
    from fusion_ray import locations

    ref = model.tokenizer or model.path
    try:
        path = locations.local_dir(ref, revision=model.revision)
        return from_dir(path, trust_remote_code=model.trust_remote_code)
    except locations.LocationError as err:
        raise ValueError(f"model {model.name!r}: {err}") from err
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"model {model.name!r}: cannot load its tokenizer from {path}: {err}") from err


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return '"ByteLevel"' in json.dumps(spec.get("decoder")) or '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))


def space_marker(tokenizer) -> str:
    return "Ġ" if is_byte_level(tokenizer) else "▁"


def surfaces(tokenizer) -> list[str]:
    """Surface of every id 0..len(tokenizer)-1 (bytes as a latin-1 string)."""
    decoder = _byte_decoder() if is_byte_level(tokenizer) else None
    specials = {t.content for t in tokenizer.added_tokens_decoder.values()}
    out = [""] * len(tokenizer)
    for tok, i in tokenizer.get_vocab().items():
        if tok in specials:
            data = tok.encode()
        elif decoder is not None:
            data = bytes(decoder[c] for c in tok) if all(c in decoder for c in tok) else tok.encode()
        elif m := _BYTE_PIECE.fullmatch(tok):
            data = bytes([int(m.group(1), 16)])
        else:
            data = tok.replace("▁", " ").encode()
        out[i] = data.decode("latin-1")
    return out
