"""Opening a model's tokenizer from its directory, as the checkpoint declares it.

transformers 5 picks the tokenizer class from `config.json`'s `model_type` when the
checkpoint's `tokenizer_config.json` names only the generic backend (`TokenizersBackend` /
`PreTrainedTokenizerFast`), and a model-specific class rebuilds its own pre-tokenizer: a
Qwen2-architecture model that ships a DeepSeek tokenizer then splits digits one by one, and one
that ships a SentencePiece tokenizer loses its spaces and newlines, though `tokenizer.json`
says otherwise. Every stage opens tokenizers here, so that what `tokenizer.json` says is what
runs, and all stages tokenize alike.
"""

from __future__ import annotations

import json
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
