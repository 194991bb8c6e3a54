"""Small cuts of the three real tokenizer families: lossless, ChatML-ready, truly cut."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fusion_ray.demo import tokenizers as demo_tok
from fusion_ray.demo.tokenizers import CHAT_SPECIALS, FAMILIES, build_tokenizer, cut_bpe

VOCAB = 2048
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — ünïcödé 日本",
    "Digits: 0 7 42 1234567 3.14159, 2024-05-01",
    "line one\nline two\n\n\nline five\n",
    "multiple   spaces    inside\tand tabs",
    "What is TCP/IP? (TCP) A protocol {not markup} [ref] <tag> ‘quoted’ “too”.",
    "<|im_start|>user\nWhat is grep?<|im_end|>\n<|im_start|>assistant\nA tool.<|im_end|>\n",
]
CHAT = [
    {"role": "user", "content": "What is grep?"},
    {"role": "assistant", "content": "A search tool."},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for family in FAMILIES:
        start = time.perf_counter()
        tok = build_tokenizer(family, VOCAB, root / family)
        out[family] = (tok, time.perf_counter() - start)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_lossless(built: dict, family: str) -> None:
    tok, seconds = built[family]
    assert seconds < 10
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_no_implicit_bos_and_mistrals_leading_space_quirk(built: dict) -> None:
    tok = built["mistral"][0]
    assert tok.decode(tok(" lead", add_special_tokens=False)["input_ids"]) == "lead"
    for family in FAMILIES:
        assert built[family][0]("hi")["input_ids"] == built[family][0].encode(
            "hi", add_special_tokens=False
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_size_and_specials(built: dict, family: str) -> None:
    tok, _ = built[family]
    assert VOCAB < len(tok) <= VOCAB + len(CHAT_SPECIALS)
    assert len(tok.backend_tokenizer.get_vocab(with_added_tokens=False)) == VOCAB
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|pad|>")
    assert tok.bos_token == demo_tok.FAMILY_SPECIALS[family][0]
    assert tok.chat_template == demo_tok.CHATML_TEMPLATE
    special_ids = tok.convert_tokens_to_ids([*CHAT_SPECIALS, tok.bos_token])
    assert len(set(special_ids)) == 4 and max(special_ids) < len(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_ids_inside_text(built: dict, family: str) -> None:
    tok, _ = built[family]
    text = f"x<|im_start|>user\nhi<|im_end|>{tok.bos_token}y<|pad|>"
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    for special in [*CHAT_SPECIALS, tok.bos_token]:
        assert tokens.count(special) == 1
    assert not any("|" in t and t not in {*CHAT_SPECIALS, tok.bos_token} for t in tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_offsets_are_monotone_and_cover_the_text(built: dict, family: str) -> None:
    tok, _ = built[family]
    for text in TEXTS:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        assert len(spans) == len(enc["input_ids"])
        assert all(0 <= s <= e <= len(text) for s, e in spans)
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(spans, spans[1:], strict=False))
        covered = {i for s, e in spans for i in range(s, e)}
        assert {i for i, c in enumerate(text) if not c.isspace()} <= covered
        for token_id, (s, e) in zip(enc["input_ids"], spans, strict=True):
            if token_id in tok.all_special_ids:
                assert text[s:e] == tok.convert_ids_to_tokens(token_id)


def test_families_really_differ(built: dict) -> None:
    words = {f: built[f][0].tokenize("hello world and more") for f in FAMILIES}
    marks = {f: {t[0] for t in words[f] if t[0] in "Ġ▁"} for f in FAMILIES}
    assert marks == {"gpt2": {"Ġ"}, "mistral": {"▁"}, "deepseek": {"Ġ"}}
    assert "▁world" in words["mistral"] and "Ġworld" in words["gpt2"]
    digits = {f: tuple(built[f][0].tokenize("in 1234567")) for f in FAMILIES}
    assert len(set(digits.values())) == 3  # gpt2 merges digits, mistral splits, deepseek 3s


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_chatml(built: dict, family: str) -> None:
    tok, _ = built[family]
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat is grep?<|im_end|>\n"
        "<|im_start|>assistant\nA search tool.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is grep?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2


@pytest.mark.parametrize("family", ["gpt2", "deepseek"])
def test_byte_level_cut_is_a_prefix_of_the_original(built: dict, family: str) -> None:
    tok, _ = built[family]
    original = demo_tok.original_spec(family)["model"]["vocab"]
    cut = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert set(cut) <= set(original)
    by_new_id = sorted(cut, key=cut.__getitem__)
    assert [original[t] for t in by_new_id] == sorted(original[t] for t in cut)
    assert tok.tokenize(" the and of") == ["Ġthe", "Ġand", "Ġof"]


def test_cut_bpe_keeps_first_mergeable_merges() -> None:
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "x", "ab", "xa", "abc", "cc"])}
    spec = {
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b", ["x", "a"], "ab c", "c c"]},
        "added_tokens": [{"id": 3, "content": "x"}, {"id": 7, "content": "cc"}],
    }
    cut = cut_bpe(spec, {"a", "b", "c"}, 5)
    assert cut["model"]["vocab"] == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}
    assert cut["model"]["merges"] == [["a", "b"], ["ab", "c"]]
    assert cut["added_tokens"] == []
    with pytest.raises(ValueError, match="base alphabet"):
        cut_bpe(spec, {"a", "b", "c"}, 2)


def test_rebuild_replaces_dir_and_unknown_family_fails(tmp_path: Path) -> None:
    first = build_tokenizer("mistral", 512, tmp_path / "tok")  # the tiny-model default
    second = build_tokenizer("mistral", 700, tmp_path / "tok")
    assert (len(first), len(second)) == (515, 703)
    text = "<|im_start|>user\nnaïve 日本 1234?<|im_end|>\n"
    assert first.decode(first(text)["input_ids"]) == text
    assert {p.name for p in tmp_path.iterdir()} == {"tok"}
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="'bert'"):
        build_tokenizer("bert", 600, tmp_path / "bert")
