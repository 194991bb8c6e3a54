"""An offline two-domain chat corpus built from Debian's dictd dictionaries.

``computing`` comes from FOLDOC and the Jargon File, ``english`` from WordNet 3.0. Each
entry becomes one chat example: a user asks about the headword ("What is X?" and a few
other phrasings) and the assistant answers with the cleaned definition, capped at about
``max_words`` words. Output is deterministic from the seed: the same seed gives
byte-identical JSONL files. Held-out rows are disjoint from train rows by headword.

This module reads local files only (``/usr/share/dictd``); it installs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

DOMAINS = ("computing", "english")
SOURCES = {"computing": ("foldoc", "jargon"), "english": ("wn",)}
DICT_DIR = Path("/usr/share/dictd")
QUESTIONS = (
    "What is {}?",
    "Define {}.",
    "What does {} mean?",
    "Explain the term {}.",
    "What is meant by {}?",
)
WN_POS = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}
_B64 = {
    c: i for i, c in enumerate(string.ascii_uppercase + string.ascii_lowercase + "0123456789+/")
}
# Markup of the dictd sources, removed from answers.
_REF = re.compile(r"\[[^\[\]]*\]")  # [references], [syn: ...], [MIT]
_LINK = re.compile(r"\{\s*([^{}]*?)\s*\}")  # {cross links}: keep the text
_TAG = re.compile(r"(?:^\s*|(?<=\d\.\s))<[^<>{}\n]{1,60}[><}]")  # FOLDOC <category>
_NOISE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)|\s*<[^<>\s]+@[^<>\s]+>")  # dates, e-mails
_PRON = re.compile(  # /pro-nun'see-AY-shn/
    r"(?<![^\s(])/(?:[^/\s]{1,30}|[^/\n]{1,40}['*][^/\n]{0,40})/(?:,|\s+or)?(?=[\s,.;)]|$)"
)
_POS = re.compile(  # Jargon parts of speech: "1. n. The stuff" -> "1. The stuff"
    r"(^\s*|\b\d+\.\s+)(?:(?:n|v|vt|vi|adj|adv|interj|excl|pl\.n|prov|imp|pref)\.,?\s*)+"
)
_XREF = re.compile(  # "See also X." / "Compare Y." sentences and "(See Z)"
    r"(?:^|(?<=[.;!?”\")]\s))(?:See|Compare|Cf\.|Mailing lists?)[\s:][^.]*(?:\.|$)"
    r"|\((?:See|Compare|Cf\.)\s[^()]*\)"
)
_SKIP_PARA = re.compile(r"^(?:See|Compare|Also|Cf\.|Examples?:|Home|E-?mail|Usenet|FTP)\b")
_WN_SENSE = re.compile(r"^ {4}(?:(n|v|adj|adv) )?\d+: ", re.M)  # "    n 1: ", "    2: "
_NO_STOP = re.compile(r"^(?:\d+|[A-Za-z]|e\.g|i\.e|etc|vs|cf|mr|dr|st)\.$", re.I)


def _b64(text: str) -> int:
    """Decode a dictd big-endian base-64 number."""
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def read_dictd(name: str) -> list[str]:
    """All entries of one dictd dictionary, in index order, without metadata or aliases.

    Args:
        name: dictionary name, e.g. ``"foldoc"`` for ``/usr/share/dictd/foldoc.index``.

    Returns:
        The raw text of each distinct entry.
    """
    index, data = DICT_DIR / f"{name}.index", DICT_DIR / f"{name}.dict.dz"
    for path in (index, data):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; install it with: apt-get update && "
                f"apt-get install -y --no-install-recommends dict-{name}"
            )
    blob = gzip.open(data).read()
    seen, entries = set(), []
    for line in index.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if headword.startswith("00") or (offset, length) in seen:
            continue
        seen.add((offset, length))
        start = _b64(offset)
        entries.append(blob[start : start + _b64(length)].decode("utf-8"))
    return entries


def _tidy(text: str) -> str:
    """Strip dictd markup shared by all three dictionaries and collapse whitespace."""
    text = _LINK.sub(r"\1", _REF.sub("", text)).replace("{", "").replace("}", "")
    text = re.sub(r"\s+([.,;:!?)”])", r"\1", " ".join(text.split()).replace("()", ""))
    text = re.sub(r"([(“])\s+", r"\1", text)
    return re.sub(r"(?<=[.!?]) \.(?=\s|$)", "", re.sub(r"(?<!\.)\.\.(?!\.)", ".", text))


def clean_prose_entry(entry: str) -> tuple[str, str]:
    """Headword and cleaned definition of a FOLDOC or Jargon File entry."""
    header, _, body = entry.strip("\n").partition("\n\n")
    body = _REF.sub("", _REF.sub("", body))
    paragraphs = []
    for para in re.split(r"\n\s*\n", body):
        para = _POS.sub(r"\1", _PRON.sub("", _TAG.sub("", _NOISE.sub("", para))))
        para = _tidy(_XREF.sub("", _tidy(para))).strip()
        if re.search(r"\w", para) and "://" not in para and not _SKIP_PARA.match(para):
            paragraphs.append(para)
    answer = _tidy(" ".join(paragraphs))
    return header.splitlines()[0].strip(), answer[:1].upper() + answer[1:]


def clean_wordnet_entry(entry: str, max_senses: int = 3) -> tuple[str, str]:
    """Headword and the first senses of a WordNet entry as numbered prose.

    ``n 1: coffee with the caffeine removed; "decaf is fine" [syn: ...]`` becomes
    ``(noun) Coffee with the caffeine removed, as in "decaf is fine".``
    """
    headword, _, body = entry.strip("\n").partition("\n")
    parts = _WN_SENSE.split(body)[1:]  # alternating POS (or None) and gloss
    senses, pos = [], "n"
    for tag, gloss in zip(parts[::2], parts[1::2], strict=True):
        pos = tag or pos
        definition, _, example = _tidy(gloss).partition('; "')
        text = definition.strip().rstrip(";")
        text = text[:1].upper() + text[1:]
        if example:
            text += ', as in "' + example.split('"')[0] + '"'
        senses.append(f"({WN_POS[pos]}) {text}" + ("" if text[-1:] in ".?!" else "."))
    senses = senses[:max_senses]
    if len(senses) == 1:
        return headword.strip(), senses[0]
    return headword.strip(), " ".join(f"{i}. {s}" for i, s in enumerate(senses, 1))


def cap_words(text: str, max_words: int) -> str:
    """Cut ``text`` to at most ``max_words`` words, at a sentence end when one is near."""
    words = text.split()
    if len(words) <= max_words:
        return text
    ends = [i for i, w in enumerate(words[:max_words]) if w[-1] in '.!?"' and not _NO_STOP.match(w)]
    if ends and ends[-1] + 1 >= max_words // 2:
        return " ".join(words[: ends[-1] + 1])
    return " ".join(words[:max_words]).rstrip(",;:") + "..."


def _domain_rows(domain: str, seed: int, limit: int | None, max_words: int) -> Iterator[dict]:
    """Chat rows of one domain in seeded order, one per distinct headword."""
    raw = [(name, entry) for name in SOURCES[domain] for entry in read_dictd(name)]
    random.Random(f"{seed}:{domain}").shuffle(raw)
    seen: set[str] = set()
    for name, entry in raw:
        clean = clean_wordnet_entry if name == "wn" else clean_prose_entry
        headword, answer = clean(entry)
        answer = cap_words(answer, max_words)
        if len(answer.split()) < 5 or headword.lower() in seen:
            continue
        seen.add(headword.lower())
        key = hashlib.sha1(f"{name}\t{headword}".encode()).hexdigest()[:16]
        question = random.Random(f"{seed}:{key}").choice(QUESTIONS).format(headword)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield {"id": f"{domain}-{key}", "domain": domain, "messages": messages}
        if limit is not None and len(seen) >= limit:
            return


def rows_past(domain: str, *, seed: int, skip: int, count: int, max_words: int) -> list[dict]:
    """`count` chat rows of `domain` past the first `skip` of its seeded stream: with `skip` =
    held-out + train rows of `build_corpus` (same seed and `max_words`), disjoint from both."""
    return list(_domain_rows(domain, seed, skip + count, max_words))[skip:]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines to a temp file beside ``path``, then rename it over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_corpus(
    out_dir: Path,
    *,
    seed: int = 0,
    heldout_per_domain: int = 300,
    max_words: int = 80,
    max_per_domain: int | None = None,
) -> dict:
    """Write ``{domain}_{split}.jsonl`` for both domains and both splits.

    Args:
        out_dir: output directory (created if needed).
        seed: drives the shuffle, the held-out choice and the question phrasing.
        heldout_per_domain: held-out rows per domain, disjoint from train by headword.
        max_words: cap on the words of each answer.
        max_per_domain: cap on train rows per domain (``None``: all entries).

    Returns:
        ``{"counts": {file name: rows}, "words": {domain: words in all messages}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts, words = {}, {}
    for domain in DOMAINS:
        limit = None if max_per_domain is None else heldout_per_domain + max_per_domain
        rows = list(_domain_rows(domain, seed, limit, max_words))
        splits = {"heldout": rows[:heldout_per_domain], "train": rows[heldout_per_domain:]}
        for split in ("train", "heldout"):
            name = f"{domain}_{split}.jsonl"
            _write_jsonl(out_dir / name, splits[split])
            counts[name] = len(splits[split])
        words[domain] = sum(len(m["content"].split()) for r in rows for m in r["messages"])
    return {"counts": counts, "words": words}
