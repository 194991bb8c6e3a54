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
