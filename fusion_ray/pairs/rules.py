"""SFT rows and DPO pairs from scored samples (FuseChat-3.0's data construction).

FuseChat-3.0 samples several responses per prompt from each source model, scores them
(a reward model such as ArmoRM for open prompts; verifiers — answer checks, unit tests —
for math and code), then splits the prompts in two: on one part the target is
fine-tuned on the best response (SFT), on the other it is trained with DPO on pairs
of one source's samples. The input here is one row per scored sample:

    prompt_id (str) · domain (str) · verifiable (bool) · source (str) ·
    sample_index (int) · response (str) · reward (float) ·
    correct (bool for verifiable prompts, None otherwise)

Our choices, where the recipe leaves room:

- Split (`split_prompts`): a prompt goes to DPO when blake2b(seed, prompt_id), read as
  a number in [0, 1), is below `dpo_fraction`. It depends on nothing but the id and the
  seed: not on row order, and adding prompts never moves existing ones.
- SFT (`build_sft`): the best response over all sources and samples; for verifiable
  prompts only among the correct ones (a prompt with none is dropped and counted).
  Highest reward wins; ties go to the lowest source name, then the lowest sample index.
- DPO (`build_dpo`): pairs are built within one source, as FuseChat-3.0 does (both
  responses then come from one distribution, so the pair differs in quality, not in
  style). Open prompts: chosen = highest reward, rejected = lowest, and the pair is kept
  only if min_gap ≤ reward gap ≤ max_gap (inclusive; FuseChat-3.0 uses [0.01, 0.1] with
  ArmoRM). Verifiable prompts: chosen = best-reward correct, rejected = worst-reward
  incorrect, whatever their rewards (the verifier outranks the reward model, so a wrong
  answer with a higher reward still loses); the gap range is NOT applied to them, since
  correctness already certifies the preference. Ties: chosen takes the lowest sample
  index among equal rewards, rejected too.
- One pair per prompt (`per_prompt="one"`, the default) keeps the pair of the source
  whose chosen response has the highest reward (ties: lowest source name), so no prompt
  is over-weighted; `per_prompt="all"` keeps one pair per source.
- Output rows are sorted by prompt id (then source), whatever the input order.

`counts` tallies, for the manifest, prompts, SFT rows, DPO pairs and the drop reasons,
in total, per source and per domain. SFT drops are per prompt (no source to blame) and
appear in the totals and per domain only; DPO drops are per (prompt, source).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

Split = Literal["sft", "dpo"]
PerPrompt = Literal["one", "all"]

COLUMNS = ("prompt_id", "domain", "verifiable", "source", "sample_index", "response", "reward", "correct")

# drop reasons (keys of `counts(...)["drops"]`)
SFT_NO_CORRECT = "sft_no_correct_response"
DPO_SINGLE_SAMPLE = "dpo_single_sample"
DPO_NO_CORRECT = "dpo_no_correct_response"
DPO_NO_INCORRECT = "dpo_no_incorrect_response"
DPO_GAP_BELOW = "dpo_gap_below_range"
DPO_GAP_ABOVE = "dpo_gap_above_range"
DPO_OTHER_SOURCE = "dpo_other_source_kept"
DROP_REASONS = (SFT_NO_CORRECT, DPO_SINGLE_SAMPLE, DPO_NO_CORRECT, DPO_NO_INCORRECT, DPO_GAP_BELOW, DPO_GAP_ABOVE,
                DPO_OTHER_SOURCE)

# slack on the inclusive gap edges, so that a gap written as 0.1 in decimal (0.6 − 0.5 = 0.0999…98) is in range
GAP_TOL = 1e-12


@dataclass(frozen=True)
class _Drop:
    prompt_id: str
    domain: str
    source: str | None
    reason: str


# ---- input ----------------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(rows: pa.Table | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as dicts, checked; ValueError naming the row index and the field."""
    if isinstance(rows, pa.Table):
        missing = [c for c in COLUMNS if c not in rows.column_names]
        if missing:
            raise ValueError(f"scored samples: missing column(s) {missing}")
        rows = rows.to_pylist()
    out: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, int], int] = {}
    prompt_meta: dict[str, tuple[int, str, bool]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i}: expected a mapping of fields, got {type(row).__name__}")
        for c in COLUMNS:
            if c not in row:
                raise ValueError(f"row {i}: missing field {c!r}")
        for c in ("prompt_id", "domain", "source", "response"):
            if not isinstance(row[c], str):
                raise ValueError(f"row {i}: field {c!r} must be a str, got {row[c]!r}")
        if not isinstance(row["verifiable"], bool):
            raise ValueError(f"row {i}: field 'verifiable' must be a bool, got {row['verifiable']!r}")
        if not _is_int(row["sample_index"]):
            raise ValueError(f"row {i}: field 'sample_index' must be an int, got {row['sample_index']!r}")
        reward = row["reward"]
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise ValueError(f"row {i}: field 'reward' must be a number, got {reward!r}")
        if math.isnan(reward):
            raise ValueError(f"row {i}: field 'reward' is NaN")
        if math.isinf(reward):
            raise ValueError(f"row {i}: field 'reward' is infinite")
        correct = row["correct"]
        if row["verifiable"] and not isinstance(correct, bool):
            raise ValueError(f"row {i}: field 'correct' must be a bool for a verifiable prompt, got {correct!r}")
        if not row["verifiable"] and correct is not None:
            raise ValueError(f"row {i}: field 'correct' must be None for a prompt that is not verifiable, "
                             f"got {correct!r}")
        pid = row["prompt_id"]
        meta = prompt_meta.setdefault(pid, (i, row["domain"], row["verifiable"]))
        if (meta[1], meta[2]) != (row["domain"], row["verifiable"]):
            raise ValueError(f"row {i}: fields 'domain'/'verifiable' = {row['domain']!r}/{row['verifiable']!r} "
                             f"differ from row {meta[0]}'s {meta[1]!r}/{meta[2]!r} for prompt {pid!r}")
        key = (pid, row["source"], row["sample_index"])
        if key in seen:
            raise ValueError(f"row {i}: duplicate (prompt_id, source, sample_index) = {key}, "
                             f"first at row {seen[key]}")
        seen[key] = i
        out.append(dict(row))
    return out


def _by_prompt(rows: list[dict[str, Any]], split: Mapping[str, str], want: Split) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, row in enumerate(rows):
        side = split.get(row["prompt_id"])
        if side not in ("sft", "dpo"):
            raise ValueError(f"row {i}: field 'prompt_id' = {row['prompt_id']!r} has no split "
                             f"('sft' or 'dpo'), got {side!r}")
        if side == want:
            groups[row["prompt_id"]].append(row)
    return {pid: groups[pid] for pid in sorted(groups)}


# ---- split ----------------------------------------------------------------------------------------

def _unit(prompt_id: str, seed: int) -> float:
    digest = hashlib.blake2b(prompt_id.encode("utf-8"), digest_size=8, key=str(seed).encode("utf-8")).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_prompts(prompt_ids: Iterable[str], dpo_fraction: float, seed: int) -> dict[str, Split]:
    """Each prompt id to "sft" or "dpo": "dpo" when its seeded hash in [0, 1) is below `dpo_fraction`."""
    if not (isinstance(dpo_fraction, (int, float)) and 0.0 <= dpo_fraction <= 1.0):
        raise ValueError(f"dpo_fraction must lie in [0, 1], got {dpo_fraction!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    out: dict[str, Split] = {}
    for i, pid in enumerate(prompt_ids):
        if not isinstance(pid, str):
            raise ValueError(f"prompt id {i}: must be a str, got {pid!r}")
        out[pid] = "dpo" if _unit(pid, seed) < dpo_fraction else "sft"
    return out


# ---- SFT ------------------------------------------------------------------------------------------

def _best_key(row: Mapping[str, Any]) -> tuple[float, str, int]:
    return (-row["reward"], row["source"], row["sample_index"])


def _sft(rows: list[dict[str, Any]], split: Mapping[str, str]) -> tuple[list[dict[str, Any]], list[_Drop]]:
    out: list[dict[str, Any]] = []
    drops: list[_Drop] = []
    for pid, group in _by_prompt(rows, split, "sft").items():
        candidates = [r for r in group if r["correct"]] if group[0]["verifiable"] else group
        if not candidates:
            drops.append(_Drop(pid, group[0]["domain"], None, SFT_NO_CORRECT))
            continue
        out.append(dict(min(candidates, key=_best_key)))
    return out, drops


def build_sft(rows: pa.Table | Iterable[Mapping[str, Any]], split: Mapping[str, str]) -> list[dict[str, Any]]:
    """The best response of each SFT prompt (all input fields of that sample), sorted by prompt id."""
    return _sft(_validate(rows), split)[0]


# ---- DPO ------------------------------------------------------------------------------------------

def _check_dpo_args(min_gap: float, max_gap: float, per_prompt: str) -> None:
    for name, v in (("min_gap", min_gap), ("max_gap", max_gap)):
        if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    if min_gap > max_gap:
        raise ValueError(f"min_gap ({min_gap}) must not exceed max_gap ({max_gap})")
    if per_prompt not in ("one", "all"):
        raise ValueError(f"per_prompt must be 'one' or 'all', got {per_prompt!r}")


def _best(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest reward of one source's samples; ties: lowest sample index."""
    return min(samples, key=lambda r: (-r["reward"], r["sample_index"]))


def _worst(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Lowest reward of one source's samples; ties: lowest sample index."""
    return min(samples, key=lambda r: (r["reward"], r["sample_index"]))


def _pair(pid: str, chosen: Mapping[str, Any], rejected: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prompt_id": pid, "domain": chosen["domain"], "verifiable": chosen["verifiable"], "source": chosen["source"],
        "chosen": chosen["response"], "rejected": rejected["response"],
        "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
        "chosen_index": chosen["sample_index"], "rejected_index": rejected["sample_index"],
    }


def _dpo(rows: list[dict[str, Any]], split: Mapping[str, str], min_gap: float, max_gap: float,
         per_prompt: str) -> tuple[list[dict[str, Any]], list[_Drop]]:
    _check_dpo_args(min_gap, max_gap, per_prompt)
    out: list[dict[str, Any]] = []
    drops: list[_Drop] = []
    for pid, group in _by_prompt(rows, split, "dpo").items():
        domain, verifiable = group[0]["domain"], group[0]["verifiable"]
        per_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            per_source[r["source"]].append(r)
        pairs: list[dict[str, Any]] = []
        for source in sorted(per_source):
            samples = per_source[source]
            if len(samples) < 2:
                drops.append(_Drop(pid, domain, source, DPO_SINGLE_SAMPLE))
                continue
            if verifiable:
                good = [r for r in samples if r["correct"]]
                bad = [r for r in samples if not r["correct"]]
                if not good:
                    drops.append(_Drop(pid, domain, source, DPO_NO_CORRECT))
                    continue
                if not bad:
                    drops.append(_Drop(pid, domain, source, DPO_NO_INCORRECT))
                    continue
                pairs.append(_pair(pid, _best(good), _worst(bad)))
                continue
            chosen, rejected = _best(samples), _worst(samples)
            gap = chosen["reward"] - rejected["reward"]
            if gap < min_gap - GAP_TOL:
                drops.append(_Drop(pid, domain, source, DPO_GAP_BELOW))
            elif gap > max_gap + GAP_TOL:
                drops.append(_Drop(pid, domain, source, DPO_GAP_ABOVE))
            else:
                pairs.append(_pair(pid, chosen, rejected))
        if per_prompt == "one" and len(pairs) > 1:
            keep = min(pairs, key=lambda p: (-p["chosen_reward"], p["source"]))
            drops.extend(_Drop(pid, domain, p["source"], DPO_OTHER_SOURCE) for p in pairs if p is not keep)
            pairs = [keep]
        out.extend(pairs)
    return out, drops


def build_dpo(rows: pa.Table | Iterable[Mapping[str, Any]], split: Mapping[str, str], *, min_gap: float = 0.01,
              max_gap: float = 0.1, per_prompt: PerPrompt = "one") -> list[dict[str, Any]]:
    """Same-source (chosen, rejected) pairs of the DPO prompts, sorted by prompt id then source.

    Each pair: prompt_id, domain, verifiable, source, chosen, rejected, chosen_reward,
    rejected_reward, chosen_index, rejected_index (the sample indices).
    """
    return _dpo(_validate(rows), split, min_gap, max_gap, per_prompt)[0]


# ---- counts ---------------------------------------------------------------------------------------

def _bucket() -> dict[str, Any]:
    return {"prompts": 0, "sft_rows": 0, "dpo_pairs": 0, "drops": dict.fromkeys(DROP_REASONS, 0)}


def counts(rows: pa.Table | Iterable[Mapping[str, Any]], split: Mapping[str, str], *, min_gap: float = 0.01,
           max_gap: float = 0.1, per_prompt: PerPrompt = "one") -> dict[str, Any]:
    """Tallies for the manifest: {"total": b, "by_source": {source: b}, "by_domain": {domain: b}}.

    Each b has "prompts" (prompts with samples: from that source, of that domain),
    "sft_rows", "dpo_pairs" and "drops" {reason: n} over DROP_REASONS; "total" also has
    "sft_prompts" and "dpo_prompts". SFT drops count per domain and in total only.
    """
    valid = _validate(rows)
    sft_rows, sft_drops = _sft(valid, split)
    dpo_rows, dpo_drops = _dpo(valid, split, min_gap, max_gap, per_prompt)
    total = _bucket()
    by_source: dict[str, dict[str, Any]] = defaultdict(_bucket)
    by_domain: dict[str, dict[str, Any]] = defaultdict(_bucket)
    prompt_domain = {r["prompt_id"]: r["domain"] for r in valid}
    for source, pids in _group_ids(valid, "source").items():
        by_source[source]["prompts"] = len(pids)
    for domain, pids in _group_ids(valid, "domain").items():
        by_domain[domain]["prompts"] = len(pids)
    total["prompts"] = len(prompt_domain)
    sides = [split[p] for p in prompt_domain]
    total["sft_prompts"], total["dpo_prompts"] = sides.count("sft"), sides.count("dpo")
    for key, out_rows in (("sft_rows", sft_rows), ("dpo_pairs", dpo_rows)):
        for r in out_rows:
            total[key] += 1
            by_source[r["source"]][key] += 1
            by_domain[r["domain"]][key] += 1
    for d in sft_drops + dpo_drops:
        total["drops"][d.reason] += 1
        by_domain[d.domain]["drops"][d.reason] += 1
        if d.source is not None:
            by_source[d.source]["drops"][d.reason] += 1
    return {"total": total, "by_source": dict(sorted(by_source.items())), "by_domain": dict(sorted(by_domain.items()))}


def _group_ids(rows: Sequence[Mapping[str, Any]], field: str) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        groups[r[field]].add(r["prompt_id"])
    return groups
