"""Tokenizers open as the checkpoint declares them (fusion_ray/tokenizer.py)."""

import ast
from pathlib import Path

import pytest

from fusion_ray import tokenizer as tokenizers

TEXT = "<|im_start|>user\nWhat does IC mean? 12345 don't\n  two  spaces<|im_end|>\n"


@pytest.mark.parametrize("family", ["deepseek", "mistral"])
def test_a_model_dir_tokenizes_as_its_tokenizer_json_says(tiny_models, family):
    """A Qwen2-architecture dir shipping another family's tokenizer: `from_dir` gives exactly the
    ids of `tokenizer.json`; transformers' AutoTokenizer (Qwen2Tokenizer by model_type) does not."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tiny_models("qwen2", family, vocab_size=1024)
    want = Tokenizer.from_file(str(path / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    tok = tokenizers.from_dir(path)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == want
    assert tok.chat_template and tok.pad_token is not None
    auto = AutoTokenizer.from_pretrained(path)
    assert auto(TEXT, add_special_tokens=False)["input_ids"] != want  # what from_dir protects against


def test_a_dir_that_declares_a_specific_class_gets_it(tiny_models, tmp_path):
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_models("qwen2", "gpt2"), path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    assert type(tokenizers.from_dir(path)).__name__ == "Qwen2Tokenizer"


def test_every_stage_opens_tokenizers_through_from_dir():
    """No AutoTokenizer.from_pretrained in the package or the benchmarks but here (and the demo
    builder, which opens a bare tokenizer dir with no config.json, and the real-model bench, which
    reads a GGUF file into the HF dir that everything after it opens through `from_dir`)."""
    root = Path(__file__).resolve().parents[1]
    allowed = {root / "fusion_ray" / "tokenizer.py", root / "fusion_ray" / "demo" / "tokenizers.py",
               root / "bench" / "real_model.py"}
    offenders = []
    for path in [*(root / "fusion_ray").rglob("*.py"), *(root / "bench").glob("*.py")]:
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "from_pretrained" \
                    and isinstance(node.value, ast.Name) and node.value.id == "AutoTokenizer":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
