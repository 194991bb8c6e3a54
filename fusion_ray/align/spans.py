"""Transfer at every pivot position a source can continue, not only at 1-1 tokens.

The 1-1 rule (project.py) transfers a source distribution only where the next pivot
token and the next source token cover the same text. Where tokenizers split words
differently, about a fifth of the pivot's positions then get nothing. But a source
position sees the same context whenever its next token STARTS at or before the pivot's
next token and covers its first char; its distribution over how the text goes on
then determines the pivot's next token, by marginalising over tokenizations:

- the pivot's next token starts at char c; the source token covering c starts at b ≤ c
  and the text `u` = text[b:c] is already written;
- every source candidate s in the top-k whose bytes start with `u` (and go past it) is a
  way the text goes on; the pivot's own tokenization of s says which pivot token would
  start at byte len(u) (`FirstPiece.after`), which gets s's probability. Candidates whose
  pivot tokenization has no boundary there are dropped: a pivot that has just closed a
  bare " " goes on with "1", never with "The" (it writes " The" as one token);
- with u non-empty this is conditioned on u: p(s | u) = p(s) / p(u), where p(u) is at
  least the kept candidates' mass and at most that plus the row's tail mass (`prefix:
  renormalize`, the default, divides by the lower bound; `tail` by the upper one, leaving
  the rest in the tail, which dilutes confident word endings: docs/findings.md#the-teacher-inside-a-source-token; `skip`
  transfers nothing there);
- where the gold source token ends before the pivot token does (the pivot token is
  longer), the gold candidate is expanded through the next source position:
  p(g) · p(x | g) for its candidates x, each mapped by the pivot token that g+x starts with.
- the top-k can miss what was written: conditioned on u, the candidates left may then all
  be wrong, and the teacher sure of them. The source's gold token (which does continue u)
  joins the candidates with its exact log-prob (`gold_logprob`, collected with the top-k;
  `gold=True`, `align.gold`), at the conditioned and expanded positions only (elsewhere a
  missing gold only sits in the tail). At the same tokenization (the shared-tokenizer
  control) no position is conditioned, so this changes nothing there.

Candidates with the same pivot id merge (logsumexp); the top k are kept. The common
case (u empty and the source token as long as the pivot's: 1-1 and most n-1 groups)
is one vectorised lookup through the first-piece vocabulary map; only the rest runs
per position.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fusion_ray.align.project import fill_fallback
from fusion_ray.distributions import merge_duplicates, stored_rows

MAX_EXPAND = 3  # source tokens chained to cover one longer pivot token
LEAD = "\n"  # what strings follow when a tokenizer adds a prefix at a text's start (FirstPiece._lead)


class FirstPiece:
    """Byte string (latin-1 str) → id of the first token of the pivot's tokenization of it."""

    def __init__(self, tokenizer, surfaces: list[str]):
        self.tok, self.surfaces = tokenizer, surfaces
        specials = set(tokenizer.all_special_ids)
        self.index: dict[str, int] = {}
        for i, s in enumerate(surfaces):
            if s and i not in specials:
                self.index.setdefault(s, i)
        self.max_len = max((len(s) for s in self.index), default=0)
        self.cache: dict[str, int] = {}
        self.cache_after: dict[tuple[str, int], int] = {}
        self.unspelled = 0  # `after` calls on text answered by the first-piece fallback (see there)
        self.lead = self._lead()

    def _lead(self) -> list[int] | None:
        """The ids of `LEAD` where the tokenizer writes something before a text's start (a
        SentencePiece dummy prefix: "x" → "▁x"), else None. Strings are then tokenized after
        `LEAD` and its ids dropped, so that they read as they do inside a text, where the
        pivot meets them."""
        probe = self.tok(["x"], add_special_tokens=False)["input_ids"][0]
        if "".join(self.surfaces[i] for i in probe) == "x":
            return None
        return self.tok([LEAD], add_special_tokens=False)["input_ids"][0]

    def __call__(self, r: str) -> int:
        hit = self.cache.get(r)
        if hit is None:
            hit = self.cache[r] = self._first(r, self._encode([r])[0])
        return hit

    def after(self, s: str, n: int) -> int:
        """The pivot token starting at byte n of the pivot's tokenization of `s`.

        -1 when that tokenization has no boundary at n: a pivot that has already closed a
        token at n would not go on with `s` (e.g. after a bare " " it writes "1", never
        "The": " The" is one token). `s` is tokenized as it reads inside a text (after
        `LEAD` where the tokenizer prefixes a text's start, as SentencePiece's dummy prefix
        does). Where the tokenization still does not spell `s` back (a normaliser), the
        first piece of `s[n:]` stands for it, counted in `unspelled`.
        """
        key = (s, n)
        hit = self.cache_after.get(key)
        if hit is None:
            hit = self.cache_after[key] = self._after(s, n)
        return hit

    def _after(self, s: str, n: int) -> int:
        ids = self._encode([s])[0]
        if not ids or "".join(self.surfaces[i] for i in ids) != s:
            self.unspelled += _is_text(s)  # (bytes that are no text, e.g. half a UTF-8 char, have no reading)
            return self(s[n:])
        at = 0
        for i in ids:
            if at == n:
                return i
            at += len(self.surfaces[i])
            if at > n:
                break
        return -1

    def _encode(self, strings: list[str]) -> list[list[int] | None]:
        texts, where = [], []
        for n, r in enumerate(strings):
            try:
                text = r.encode("latin-1").decode("utf-8")
            except (UnicodeDecodeError, UnicodeEncodeError):
                continue
            if text:
                texts.append(text)
                where.append(n)
        out: list[list[int] | None] = [None] * len(strings)
        if texts:
            lead = self.lead
            if lead is not None:
                texts = [LEAD + t for t in texts]
            for n, ids in zip(where, self.tok(texts, add_special_tokens=False)["input_ids"], strict=True):
                if lead is None:
                    out[n] = ids
                elif ids[:len(lead)] == lead:  # else the text merged into LEAD: no reading of it
                    out[n] = ids[len(lead):]
        return out

    def _first(self, r: str, ids: list[int] | None) -> int:
        """The tokenizer's first token when its bytes start `r`, else the longest vocab prefix."""
        if ids and self.surfaces[ids[0]] and r.startswith(self.surfaces[ids[0]]):
            return ids[0]
        for n in range(min(len(r), self.max_len), 0, -1):
            i = self.index.get(r[:n])
            if i is not None:
                return i
        return -1

    def vocab_map(self, source_surfaces: list[str], specials: dict[int, int]) -> np.ndarray:
        """[V_source] first pivot piece of every source token (-1: none); specials forced."""
        out = np.array([self._first(s, ids) for s, ids in zip(source_surfaces, self._encode(source_surfaces),
                                                               strict=True)], dtype=np.int32)
        for s, p in specials.items():
            out[s] = p
        return out


def _is_text(s: str) -> bool:
    try:
        s.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return False
    return True


def _bytes(text: str, a: int, b: int) -> str:
    return text[a:b].encode("utf-8").decode("latin-1")


def _candidates(ids: np.ndarray, lp: np.ndarray, s_surf: list[str], u: str) -> list[tuple[str, float, int]]:
    """(surface, log-prob, source id) of the top-k entries that continue the written prefix u."""
    out = []
    for i, v in zip(ids.tolist(), lp.tolist(), strict=True):
        s = s_surf[i]
        if v > -np.inf and len(s) > len(u) and s.startswith(u):
            out.append((s, v, i))
    return out


def _with_gold(ids: np.ndarray, lp: np.ndarray, g: int, gold_lp: np.ndarray | None,
               row: int) -> tuple[np.ndarray, np.ndarray]:
    """A top-k row plus the gold token g with its exact log-prob where the row lacks it."""
    if gold_lp is None or row >= len(gold_lp) or np.any(ids[np.isfinite(lp)] == g):
        return ids, lp
    return np.append(ids, g), np.append(lp, np.float32(gold_lp[row]))


def _exact_index(source: dict) -> dict[tuple[int, int], tuple[float, np.ndarray, np.ndarray]]:
    """(stored row, prefix bytes) → (log M(u), extender ids, their log-probs) of a source row
    collected with `align.prefix: exact` (schema.CONDITIONED)."""
    if "cond_rows" not in source:
        raise ValueError("align.prefix exact needs the sources collected with it (schema.CONDITIONED "
                         "columns missing): rerun collect")
    rows, lens = np.asarray(source["cond_rows"]), np.asarray(source["cond_prefix"])
    mass = np.asarray(source["cond_mass"], dtype=np.float64)
    c_ids, c_lps = np.asarray(source["cond_ids"]), np.asarray(source["cond_logprobs"], dtype=np.float64)
    return {(int(r), int(n)): (float(m), c_ids[i], c_lps[i])
            for i, (r, n, m) in enumerate(zip(rows.tolist(), lens.tolist(), mass.tolist(), strict=True))}


def _exact(index: dict, row: int, u: str, shorter: bool, first: FirstPiece, s_surf: list[str],
           k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact conditioned teacher at one pivot position: p(s | u) = p(s) / M(u) for the stored
    extenders s of the written prefix u, each on the pivot token its own tokenization starts at
    byte len(u) (`FirstPiece.after`); what does not map, and every extender not stored, stays in
    the tail. None (not transferred) where nothing maps, where u is empty (no conditioning:
    the 1-1 and vectorised paths hold those), and where the source token ends before the pivot
    token (`shorter`): no candidate is expanded, the written one no more than the others."""
    if not u or shorter:
        return None
    hit = index.get((row, len(u)))
    if hit is None or not np.isfinite(hit[0]):
        return None
    mass, c_ids, c_lps = hit
    out_ids, out_lp = [], []
    for i, v in zip(c_ids.tolist(), c_lps.tolist(), strict=True):
        if v == -np.inf:
            continue
        pid = first.after(s_surf[i], len(u))
        if pid >= 0:
            out_ids.append(pid)
            out_lp.append(v - mass)
    if not out_ids:
        return None
    return merge_duplicates(np.asarray([out_ids]), np.asarray([out_lp], dtype=np.float32), k)


class _Source:
    """One source `logits/` row as the span transfer reads it."""

    def __init__(self, source: dict, text: str, surfaces: list[str], scored_only: bool, gold: bool):
        self.text, self.surfaces = text, surfaces
        self.tokens = np.asarray(source["input_ids"])
        self.ends = np.asarray(source["offsets"], dtype=np.int64)  # char end of each source token
        # top-k row holding the prediction made at each position (of the token after it; -1: not stored)
        self.rows = stored_rows(np.asarray(source["loss_mask"], bool), scored_only)
        self.topk_ids = np.asarray(source["topk_ids"])
        self.topk_logprobs = np.asarray(source["topk_logprobs"], dtype=np.float32)
        self.gold_logprobs = (np.asarray(source["gold_logprob"], dtype=np.float32)
                              if gold and "gold_logprob" in source else None)

    def spells(self, token: int, start: int) -> bool:
        """Whether source token number `token`, starting at char `start`, is the text it covers
        (not a special token, no normalisation)."""
        return self.surfaces[self.tokens[token]] == _bytes(self.text, start, int(self.ends[token]))

    def row_with_gold(self, row: int, gold_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k row `row` (ids, log-probs), plus the gold token where `gold` asks for it (`_with_gold`)."""
        return _with_gold(self.topk_ids[row], self.topk_logprobs[row], gold_id, self.gold_logprobs, row)


class _Targets(NamedTuple):
    """Where each scored pivot position's next token meets the source: the pivot token spans
    chars [start, end); `covering` is the source token covering `start` (the first ending after
    it), which starts at `covering_start`; `row` is the source's top-k row predicting that token.
    `usable`: the position can be transferred at all; `whole`: the vectorised case, the source
    token starts where the pivot token does and covers it."""

    start: np.ndarray
    end: np.ndarray
    covering: np.ndarray
    covering_start: np.ndarray
    row: np.ndarray
    usable: np.ndarray
    whole: np.ndarray


def _locate(pivot_ends: np.ndarray, scored: np.ndarray, source: _Source) -> _Targets:
    """The source token under each scored pivot position's next token (`_Targets`)."""
    source_ends = source.ends
    start, end = pivot_ends[scored], pivot_ends[scored + 1]
    covering = np.searchsorted(source_ends, start, side="right")
    usable = (covering >= 1) & (covering < len(source_ends)) & (end > start)
    covering = np.clip(covering, 1, len(source_ends) - 1)
    covering_start = source_ends[covering - 1]
    row = np.where(usable, source.rows[np.maximum(covering - 1, 0)], -1)
    usable &= row >= 0
    # pivot tokens whose last byte is shared with the next token (a split char) are left out
    end_after_next = pivot_ends[np.minimum(scored + 2, len(pivot_ends) - 1)]
    usable &= (scored + 2 >= len(pivot_ends)) | (end_after_next > end)
    whole = usable & (covering_start == start) & (source_ends[covering] >= end)
    return _Targets(start, end, covering, covering_start, row, usable, whole)


def _label_teacher(source: _Source, covering: int, written: str, first: FirstPiece,
                   k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`prefix: label` (the ablation): all mass on the pivot piece of the written source token
    that starts at byte len(written); None where the pivot's tokenization has no boundary there."""
    pivot_id = first.after(source.surfaces[source.tokens[covering]], len(written))
    if pivot_id < 0:
        return None
    ids, logprobs = np.zeros(k, dtype=np.int64), np.full(k, -np.inf, dtype=np.float32)
    ids[0], logprobs[0] = pivot_id, 0.0
    return ids, logprobs


def _expand_gold(gold_chain: list[tuple[str, float]], source: _Source, covering: int,
                 pivot_end: int) -> list[tuple[str, float]]:
    """Continuations of the gold candidate through the next source positions, while the gold
    path ends before the pivot token does (at most `MAX_EXPAND` tokens): each candidate x of the
    next position gives (gold text + x, log p(gold) + log p(x | gold)). The gold path not expanded
    further comes last: the pivot piece it starts with stands for it."""
    continuations: list[tuple[str, float]] = []
    depth, at = 0, covering
    while gold_chain and depth < MAX_EXPAND and at + 1 < len(source.ends):
        (gold_text, gold_logprob), = gold_chain
        row = source.rows[at]
        next_gold = source.tokens[at + 1]
        if row < 0 or not source.spells(at + 1, int(source.ends[at])):
            break
        gold_chain = []
        ids, logprobs = source.row_with_gold(row, int(next_gold))
        for x, x_logprob in zip(ids.tolist(), logprobs.tolist(), strict=True):
            if x_logprob == -np.inf or not source.surfaces[x]:
                continue
            path = (gold_text + source.surfaces[x], gold_logprob + x_logprob)
            if x == next_gold and source.ends[at + 1] < pivot_end:
                gold_chain = [path]
            else:
                continuations.append(path)
        depth, at = depth + 1, at + 1
    return continuations + gold_chain


def _on_pivot_tokens(continuations: list[tuple[str, float]], first: FirstPiece,
                     written_len: int) -> tuple[list[int], np.ndarray]:
    """Each continuation on the pivot token its tokenization starts at byte `written_len`
    (`FirstPiece.after`); those with no boundary there are dropped."""
    pivot_ids, logprobs = [], []
    for surface, logprob in continuations:
        pivot_id = first.after(surface, written_len)
        if pivot_id >= 0:
            pivot_ids.append(pivot_id)
            logprobs.append(logprob)
    return pivot_ids, np.asarray(logprobs, dtype=np.float64)


def _written_prefix_logmass(kept: list[float], row_logprobs: np.ndarray, prefix: str) -> float:
    """log p(u) of the written prefix u: the mass of the kept candidates (a lower bound), or with
    `prefix: tail` that plus the row's tail mass (an upper bound: the rest stays in the tail)."""
    mass = np.logaddexp.reduce(np.asarray(kept, dtype=np.float64))
    if prefix == "tail":
        tail = 1.0 - np.exp(np.logaddexp.reduce(row_logprobs.astype(np.float64)))
        mass = np.logaddexp(mass, np.log(tail) if tail > 0 else -np.inf)
    return mass


def _conditioned_teacher(source: _Source, covering: int, row: int, written: str, pivot_end: int,
                         first: FirstPiece, k: int, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The source's distribution over how the text goes on after the written prefix, on pivot
    tokens: the candidates continuing it, the gold one expanded where it is shorter than the pivot
    token, conditioned on the prefix (p(s | u) = p(s) / p(u)) when there is one."""
    gold_id = int(source.tokens[covering])
    candidates = _candidates(*source.row_with_gold(row, gold_id), source.surfaces, written)
    if not candidates:
        return None
    expand = int(source.ends[covering]) < pivot_end
    # the gold candidate is expanded while it ends before the pivot token does
    gold_chain = [(text, logprob) for text, logprob, i in candidates if i == gold_id and expand]
    continuations = [(text, logprob) for text, logprob, i in candidates if not (i == gold_id and expand)]
    # what p(u) is made of: the candidates the pivot would split at len(u), and the gold one
    kept = ([logprob for text, logprob in continuations if first.after(text, len(written)) >= 0]
            + [logprob for _, logprob in gold_chain])
    continuations += _expand_gold(gold_chain, source, covering, pivot_end)
    pivot_ids, logprobs = _on_pivot_tokens(continuations, first, len(written))
    if not pivot_ids:
        return None
    if written:  # condition on the written prefix: p(s | u) = p(s) / p(u)
        logprobs -= _written_prefix_logmass(kept, source.topk_logprobs[row], prefix)
    return merge_duplicates(np.asarray([pivot_ids]), logprobs[None].astype(np.float32), k)


def _teacher_at(targets: _Targets, n: int, source: _Source, first: FirstPiece, k: int, prefix: str,
                exact: dict | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The transferred distribution (ids, log-probs) at scored pivot position n, off the
    vectorised path; None: not transferred."""
    covering, row = int(targets.covering[n]), int(targets.row[n])
    token_start, pivot_end = int(targets.covering_start[n]), int(targets.end[n])
    written = _bytes(source.text, token_start, int(targets.start[n]))  # u: the source token's part before
    if written and prefix == "skip":
        return None
    if not source.spells(covering, token_start):
        return None  # the source token is not the text it covers (a special token, normalisation)
    token_end = int(source.ends[covering])
    if prefix == "label" and written and token_end >= pivot_end:  # the ablation: the written token only
        return _label_teacher(source, covering, written, first, k)
    if prefix == "exact":
        return _exact(exact, row, written, token_end < pivot_end, first, source.surfaces, k)
    return _conditioned_teacher(source, covering, row, written, pivot_end, first, k, prefix)


def transfer_spans(pivot: dict, source: dict, text: str, first_map: np.ndarray, first: FirstPiece,
                   s_surf: list[str], *, k: int, fallback: str = "pivot", pivot_scored_only: bool = False,
                   source_scored_only: bool = False, prefix: str = "renormalize", gold: bool = True) -> dict:
    """Aligned distribution of one source over the pivot's scored positions (offsets must meet).

    Args:
        pivot, source: `logits/` rows of the same sample (numpy arrays).
        text: the prepared text both tokenized.
        first_map: [V_source] `FirstPiece.vocab_map` of the source vocabulary.
        s_surf: source token surfaces (vocab.surfaces).
        gold: at conditioned and expanded positions, add the source's gold token with its
            exact log-prob (`gold_logprob`) when the top-k lacks it, so that the conditioned
            distribution always holds what was written.
        prefix: at a pivot position inside a source token, `renormalize` / `tail` / `skip`
            (see `align.prefix`), `exact` (the collected exact entries, `_exact`), or `label`:
            an ablation with no source information, the teacher one-hot on the pivot piece of
            the written source token (where the source token covers the pivot's).

    Returns:
        {"topk_ids" [P, k], "topk_logprobs" [P, k], "transferred" [P], "kinds" [P]} with
        kinds 0 none, 1 vectorised (the source token starts with the pivot's and covers it),
        2 conditioned on a written prefix or expanded.
    """
    pivot_ends = np.asarray(pivot["offsets"], dtype=np.int64)
    scored = np.flatnonzero(np.asarray(pivot["loss_mask"], dtype=bool))
    source_row = _Source(source, text, s_surf, source_scored_only, gold)
    exact = _exact_index(source) if prefix == "exact" else None
    targets = _locate(pivot_ends, scored, source_row)

    ids = np.zeros((len(scored), k), dtype=np.int64)
    lp = np.full((len(scored), k), -np.inf, dtype=np.float32)
    kinds = np.where(targets.whole, 1, 0)
    if targets.whole.any():
        rows = targets.row[targets.whole]
        ids[targets.whole], lp[targets.whole] = merge_duplicates(first_map[source_row.topk_ids[rows]],
                                                                 source_row.topk_logprobs[rows], k)
    for n in np.flatnonzero(targets.usable & ~targets.whole):
        got = _teacher_at(targets, n, source_row, first, k, prefix, exact)
        if got is not None:
            ids[n], lp[n] = got
            kinds[n] = 2
    done = kinds > 0
    fill_fallback(ids, lp, ~done, pivot, fallback, pivot_scored_only)
    return {"topk_ids": ids.astype(np.int32), "topk_logprobs": lp, "transferred": done, "kinds": kinds}
