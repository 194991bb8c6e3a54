"""Vocabulary maps source id → pivot id (`exact`, `mined`, `statistics`), cached on disk.

Tokens are compared by their *surface*: the bytes they stand for (byte-level `Ġ`/`Ċ`
symbols decoded, SentencePiece `▁` → space and `<0xNN>` → the byte), written as a
latin-1 string so every byte is one character. This generalises "same string after
translating the space marker" to any pair of families.

- `exact`: the pivot token with the same surface (lowest id); none → -1 (dropped).
- `mined` (FuseLLM): exact hit, else the pivot token at minimum edit distance (ties →
  lowest pivot id), with rapidfuzz's C edit distance in row chunks (never V×V at once).
- `statistics` (FuseChat-2): the pivot token of the same surface where there is one, else,
  among pivot tokens co-aligned with the source token in
  the corpus (a SPARSE counter of aligned (pivot, source) pairs), the one minimising
  edit distance × (0.1 if one surface contains the other else 1) × sigmoid(count);
  ties → lowest id. Tokens never co-aligned take `unseen_to`: the `mined` map by
  default (the reference maps them to the pivot's unk, else eos, which puts their
  mass on a wrong token; -1 drops them into the tail). bos → bos, eos → eos always.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, cpdist

from fusion_ray.tokenizer import is_byte_level, space_marker, surfaces  # noqa: F401 (re-exported for align)


def _first_index(strings: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, s in enumerate(strings):
        index.setdefault(s, i)
    return index


def exact_map(source: list[str], pivot: list[str]) -> np.ndarray:
    index = _first_index(pivot)
    return np.array([index.get(s, -1) for s in source], dtype=np.int32)


def mined_map(source: list[str], pivot: list[str], chunk: int = 512) -> np.ndarray:
    """Exact hit, else minimum edit distance (ties → lowest pivot id)."""
    out = exact_map(source, pivot)
    todo = np.flatnonzero(out < 0)
    for lo in range(0, len(todo), chunk):
        rows = todo[lo:lo + chunk]
        dist = cdist([source[i] for i in rows], pivot, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        out[rows] = dist.argmin(axis=1)  # first minimum: the lowest pivot id
    return out


def count_pairs(pivot_ids: np.ndarray, source_ids: np.ndarray, source_vocab: int) -> np.ndarray:
    """Sparse counter entries for aligned (pivot id, source id) pairs: [(key, count)] as int64 [n, 2]."""
    keys = pivot_ids.astype(np.int64) * source_vocab + source_ids.astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    return np.stack([uniq, counts], axis=1)


def merge_counts(parts: list[np.ndarray]) -> np.ndarray:
    """Sum sparse counters (each [n, 2] of key, count)."""
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    allc = np.concatenate(parts)
    uniq, inverse = np.unique(allc[:, 0], return_inverse=True)
    return np.stack([uniq, np.bincount(inverse, weights=allc[:, 1]).astype(np.int64)], axis=1)


def statistics_map(counts: np.ndarray, source: list[str], pivot: list[str], *, source_vocab: int,
                   specials: dict[int, int], unseen_to: int | np.ndarray = -1) -> np.ndarray:
    """FuseChat-2's statistics-based map from a sparse co-alignment counter.

    A source token whose surface the pivot has maps to that pivot token first (as the
    FuseChat-2 reference does), whatever the counts; the counts decide the rest.

    Args:
        counts: [n, 2] (pivot_id * source_vocab + source_id, count).
        specials: source id → pivot id forced (bos → bos, eos → eos).
        unseen_to: pivot id (or a [V_source] map) for source tokens never co-aligned;
            -1 drops them.
    """
    out = np.zeros(len(source), dtype=np.int32) + np.asarray(unseen_to, dtype=np.int32)
    if len(counts):
        p_ids, s_ids = counts[:, 0] // source_vocab, counts[:, 0] % source_vocab
        s_str, p_str = [source[i] for i in s_ids], [pivot[i] for i in p_ids]
        dist = cpdist(s_str, p_str, scorer=Levenshtein.distance, dtype=np.int32, workers=-1).astype(np.float64)
        contains = np.array([a in b or b in a for a, b in zip(s_str, p_str, strict=True)])
        score = dist * np.where(contains, 0.1, 1.0) / (1.0 + np.exp(-counts[:, 1].astype(np.float64)))
        order = np.lexsort((p_ids, score, s_ids))  # per source id: lowest score, then lowest pivot id
        first = np.ones(len(order), dtype=bool)
        first[1:] = s_ids[order][1:] != s_ids[order][:-1]
        out[s_ids[order][first]] = p_ids[order][first]
    exact = exact_map(source, pivot)
    out[exact >= 0] = exact[exact >= 0]
    for s, p in specials.items():
        out[s] = p
    return out


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cached(path: Path, build) -> np.ndarray:
    """Load an int32 map from `path`, or build and save it (atomically)."""
    if path.exists():
        return np.load(path)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.npy")
    np.save(tmp, value)
    tmp.replace(path)
    return value
