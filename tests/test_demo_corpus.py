"""The offline dictd chat corpus: determinism, splits, cleaning and the word cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion_ray.demo import corpus
from fusion_ray.demo.corpus import DOMAINS, build_corpus, cap_words

pytestmark = pytest.mark.skipif(
    not (corpus.DICT_DIR / "wn.index").exists(), reason="dict-wn/foldoc/jargon not installed"
)

FOLDOC_ENTRY = """Transmission Control Protocol
TCP

   <protocol> (TCP) The most common {transport layer} protocol
   used on {Ethernet} and the {Internet}.  /tee-see-pee/ It was
   developed by {DARPA} [{RFC 793}].

   See also {UDP}.

   (2001-05-01)
"""
WORDNET_ENTRY = """walloping
    adj 1: (used informally) very large; "a thumping loss" [syn:
           {humongous}, {banging}, {thumping}, {whopping},
           {walloping}]
    n 1: a sound defeat [syn: {thrashing}, {walloping}, {debacle}]
"""


def _headword(row: dict) -> str:
    """The headword a row's question asks about, recovered from the question templates."""
    question = row["messages"][0]["content"]
    for template in sorted(corpus.QUESTIONS, key=len, reverse=True):
        prefix, suffix = template.split("{}")
        if question.startswith(prefix) and question.endswith(suffix):
            return question[len(prefix) : len(question) - len(suffix)].lower()
    raise AssertionError(f"question matches no template: {question!r}")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(out, seed=3, heldout_per_domain=20, max_words=40, max_per_domain=60)
    return out, stats


def test_same_seed_gives_identical_files(small: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = small
    build_corpus(tmp_path, seed=3, heldout_per_domain=20, max_words=40, max_per_domain=60)
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == sorted(f"{d}_{s}.jsonl" for d in DOMAINS for s in ("train", "heldout"))
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_other_seed_gives_other_split(small: tuple[Path, dict], tmp_path: Path) -> None:
    build_corpus(tmp_path, seed=4, heldout_per_domain=20, max_words=40, max_per_domain=60)
    a = {r["id"] for r in _read(small[0] / "english_heldout.jsonl")}
    assert a != {r["id"] for r in _read(tmp_path / "english_heldout.jsonl")}


def test_counts_splits_and_rows(small: tuple[Path, dict]) -> None:
    out, stats = small
    for domain in DOMAINS:
        train, held = _read(out / f"{domain}_train.jsonl"), _read(out / f"{domain}_heldout.jsonl")
        assert (len(train), len(held)) == (60, 20)
        assert stats["counts"][f"{domain}_train.jsonl"] == 60
        assert stats["words"][domain] > 0
        assert not {_headword(r) for r in train} & {_headword(r) for r in held}
        assert not {r["id"] for r in train} & {r["id"] for r in held}
        for row in train + held:
            assert row["domain"] == domain and row["id"].startswith(f"{domain}-")
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            answer = row["messages"][1]["content"]
            assert 5 <= len(answer.split()) <= 40
            assert not set("{}") & set(answer) and "[syn:" not in answer and "\n" not in answer


def test_domains_differ(small: tuple[Path, dict]) -> None:
    english = " ".join(r["messages"][1]["content"] for r in _read(small[0] / "english_train.jsonl"))
    assert "(noun)" in english or "(verb)" in english or "(adjective)" in english
    computing = _read(small[0] / "computing_train.jsonl")
    assert not any(r["messages"][1]["content"].startswith("(noun)") for r in computing)


def test_clean_prose_entry() -> None:
    headword, answer = corpus.clean_prose_entry(FOLDOC_ENTRY)
    assert headword == "Transmission Control Protocol"
    assert answer == (
        "(TCP) The most common transport layer protocol used on Ethernet and the Internet. "
        "It was developed by DARPA."
    )


def test_clean_wordnet_entry() -> None:
    headword, answer = corpus.clean_wordnet_entry(WORDNET_ENTRY)
    assert headword == "walloping"
    assert answer == (
        '1. (adjective) (used informally) very large, as in "a thumping loss". '
        "2. (noun) A sound defeat."
    )


def test_cap_words_cuts_at_sentence_or_word() -> None:
    text = "One two three four five. " * 10
    assert cap_words(text, 12) == "One two three four five. One two three four five."
    long = " ".join(f"w{i}" for i in range(100))
    capped = cap_words(long, 20)
    assert len(capped.split()) == 20 and capped.endswith("w19...")
    assert cap_words("short text here", 20) == "short text here"


def test_missing_dictionary_names_file_and_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(corpus, "DICT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"foldoc\.index.*apt-get install.*dict-foldoc"):
        build_corpus(tmp_path / "out", max_per_domain=1)
