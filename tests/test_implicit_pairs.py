"""SFT rows and DPO pairs from scored samples, on reward tables written by hand."""

from __future__ import annotations

import pyarrow as pa
import pytest

from fusion_ray.pairs.rules import build_dpo, build_sft, counts, split_prompts


def _row(pid, domain, verifiable, source, idx, reward, correct=None):
    return {"prompt_id": pid, "domain": domain, "verifiable": verifiable, "source": source, "sample_index": idx,
            "response": f"{pid}/{source}/{idx}", "reward": reward, "correct": correct}


# 3 prompts × 2 sources × 3 samples
TABLE = [
    # open prompt: alpha's gap 0.56 − 0.45 = 0.11 (above [0.01, 0.1]); beta's 0.60 − 0.52 = 0.08
    _row("p-open", "chat", False, "alpha", 0, 0.50),
    _row("p-open", "chat", False, "alpha", 1, 0.56),
    _row("p-open", "chat", False, "alpha", 2, 0.45),
    _row("p-open", "chat", False, "beta", 0, 0.60),
    _row("p-open", "chat", False, "beta", 1, 0.52),
    _row("p-open", "chat", False, "beta", 2, 0.55),
    # verifiable: alpha's wrong answer has the highest reward of all; beta is always right (ties at 0.8)
    _row("p-math", "math", True, "alpha", 0, 0.90, False),
    _row("p-math", "math", True, "alpha", 1, 0.30, True),
    _row("p-math", "math", True, "alpha", 2, 0.70, True),
    _row("p-math", "math", True, "beta", 0, 0.80, True),
    _row("p-math", "math", True, "beta", 1, 0.80, True),
    _row("p-math", "math", True, "beta", 2, 0.80, True),
    # verifiable, nobody right
    _row("p-code", "code", True, "alpha", 0, 0.40, False),
    _row("p-code", "code", True, "alpha", 1, 0.20, False),
    _row("p-code", "code", True, "alpha", 2, 0.10, False),
    _row("p-code", "code", True, "beta", 0, 0.95, False),
    _row("p-code", "code", True, "beta", 1, 0.50, False),
    _row("p-code", "code", True, "beta", 2, 0.60, False),
]
PIDS = ["p-open", "p-math", "p-code"]
ALL_SFT = dict.fromkeys(PIDS, "sft")
ALL_DPO = dict.fromkeys(PIDS, "dpo")


def _picks(rows):
    return [(r["prompt_id"], r["source"], r["sample_index"]) for r in rows]


def _pairs(rows):
    return [(r["prompt_id"], r["source"], r["chosen_index"], r["rejected_index"]) for r in rows]


def test_sft_best_across_sources_correct_only():
    rows = build_sft(TABLE, ALL_SFT)
    # sorted by prompt id; p-code has no correct response: dropped
    assert _picks(rows) == [("p-math", "beta", 0),  # 0.8 correct beats alpha's 0.9 wrong; tie 0.8 → index 0
                            ("p-open", "beta", 0)]  # 0.60, best over both sources
    assert rows[1]["response"] == "p-open/beta/0" and rows[1]["reward"] == 0.60
    # row order does not matter, nor does the input's form
    assert build_sft(list(reversed(TABLE)), ALL_SFT) == rows
    assert build_sft(pa.Table.from_pylist(TABLE), ALL_SFT) == rows


def test_sft_ties_lowest_source_then_index():
    rows = [_row("q", "chat", False, "zeta", 0, 0.7), _row("q", "chat", False, "eta", 2, 0.7),
            _row("q", "chat", False, "eta", 1, 0.7), _row("q", "chat", False, "eta", 3, 0.5)]
    assert _picks(build_sft(rows, {"q": "sft"})) == [("q", "eta", 1)]


def test_sft_uses_only_sft_prompts():
    split = {"p-open": "dpo", "p-math": "sft", "p-code": "sft"}
    assert _picks(build_sft(TABLE, split)) == [("p-math", "beta", 0)]


def test_dpo_same_source_pairs():
    rows = build_dpo(TABLE, ALL_DPO, min_gap=0.01, max_gap=0.1, per_prompt="all")
    assert _pairs(rows) == [
        ("p-math", "alpha", 2, 0),  # best correct (0.7) vs worst incorrect, though that one has 0.9
        ("p-open", "beta", 0, 1),  # 0.60 vs 0.52; alpha's gap 0.11 is above the range
    ]
    math_pair = rows[0]
    assert (math_pair["chosen"], math_pair["rejected"]) == ("p-math/alpha/2", "p-math/alpha/0")
    assert (math_pair["chosen_reward"], math_pair["rejected_reward"]) == (0.70, 0.90)
    assert math_pair["domain"] == "math" and math_pair["verifiable"] is True
    assert build_dpo(list(reversed(TABLE)), ALL_DPO, per_prompt="all") == rows


def test_dpo_one_pair_per_prompt_highest_chosen_reward():
    # with a wide range both sources pair on p-open: alpha (0.56 vs 0.45) and beta (0.60 vs 0.52)
    wide = {"min_gap": 0.0, "max_gap": 1.0}
    assert _pairs(build_dpo(TABLE, {"p-open": "dpo"} | {"p-math": "sft", "p-code": "sft"}, per_prompt="all",
                            **wide)) == [("p-open", "alpha", 1, 2), ("p-open", "beta", 0, 1)]
    one = build_dpo(TABLE, ALL_DPO, per_prompt="one", **wide)
    assert _pairs(one) == [("p-math", "alpha", 2, 0), ("p-open", "beta", 0, 1)]
    # equal chosen rewards: the lowest source name
    tie = [_row("q", "chat", False, "b", 0, 0.9), _row("q", "chat", False, "b", 1, 0.5),
           _row("q", "chat", False, "a", 0, 0.9), _row("q", "chat", False, "a", 1, 0.6)]
    assert _pairs(build_dpo(tie, {"q": "dpo"}, per_prompt="one", **wide)) == [("q", "a", 0, 1)]
    with pytest.raises(ValueError, match="per_prompt must be 'one' or 'all'"):
        build_dpo(tie, {"q": "dpo"}, per_prompt="some")  # type: ignore[arg-type]


def test_dpo_gap_edges_inclusive():
    def prompt(pid, hi, lo):
        return [_row(pid, "chat", False, "s", 0, hi), _row(pid, "chat", False, "s", 1, lo)]

    rows = (prompt("at-min", 0.51, 0.50) + prompt("at-max", 0.60, 0.50) + prompt("below", 0.509, 0.50)
            + prompt("above", 0.6001, 0.50) + prompt("inside", 0.55, 0.50))
    split = dict.fromkeys(["at-min", "at-max", "below", "above", "inside"], "dpo")
    kept = build_dpo(rows, split, min_gap=0.01, max_gap=0.1)
    assert [r["prompt_id"] for r in kept] == ["at-max", "at-min", "inside"]
    c = counts(rows, split, min_gap=0.01, max_gap=0.1)
    assert c["total"]["drops"]["dpo_gap_below_range"] == 1
    assert c["total"]["drops"]["dpo_gap_above_range"] == 1
    assert c["total"]["dpo_pairs"] == 3


def test_dpo_gap_not_applied_to_verifiable():
    rows = [_row("v", "math", True, "s", 0, 0.5001, True), _row("v", "math", True, "s", 1, 0.5, False)]
    assert _pairs(build_dpo(rows, {"v": "dpo"}, min_gap=0.01, max_gap=0.1)) == [("v", "s", 0, 1)]


def test_dpo_single_sample_dropped():
    rows = [_row("q", "chat", False, "solo", 0, 0.9), _row("q", "chat", False, "duo", 0, 0.55),
            _row("q", "chat", False, "duo", 1, 0.5)]
    assert _pairs(build_dpo(rows, {"q": "dpo"})) == [("q", "duo", 0, 1)]
    assert counts(rows, {"q": "dpo"})["by_source"]["solo"]["drops"]["dpo_single_sample"] == 1


def test_counts_manifest():
    split = {"p-open": "dpo", "p-math": "dpo", "p-code": "sft"}
    c = counts(TABLE, split, min_gap=0.01, max_gap=0.1, per_prompt="one")
    total = c["total"]
    assert (total["prompts"], total["sft_prompts"], total["dpo_prompts"]) == (3, 1, 2)
    assert (total["sft_rows"], total["dpo_pairs"]) == (0, 2)
    assert {k: v for k, v in total["drops"].items() if v} == {
        "sft_no_correct_response": 1,  # p-code
        "dpo_gap_above_range": 1,  # p-open / alpha
        "dpo_no_incorrect_response": 1,  # p-math / beta
    }
    assert c["by_source"]["alpha"]["prompts"] == 3 and c["by_source"]["alpha"]["dpo_pairs"] == 1
    assert c["by_source"]["beta"]["dpo_pairs"] == 1
    assert c["by_source"]["alpha"]["drops"]["dpo_gap_above_range"] == 1
    assert c["by_source"]["beta"]["drops"]["dpo_no_incorrect_response"] == 1
    assert sum(c["by_source"][s]["drops"]["sft_no_correct_response"] for s in ("alpha", "beta")) == 0
    assert c["by_domain"]["code"]["drops"]["sft_no_correct_response"] == 1
    assert [c["by_domain"][d]["dpo_pairs"] for d in ("chat", "code", "math")] == [1, 0, 1]
    # all DPO: p-code gives no pair from either source (nothing correct)
    c = counts(TABLE, ALL_DPO)
    assert c["by_domain"]["code"]["drops"]["dpo_no_correct_response"] == 2
    # all SFT: rows attributed to the source of the picked response
    c = counts(TABLE, ALL_SFT)
    assert c["by_source"]["beta"]["sft_rows"] == 2 and c["by_source"]["alpha"]["sft_rows"] == 0


def test_split_deterministic_fraction_and_stable():
    ids = [f"prompt-{i:05d}" for i in range(2000)]
    split = split_prompts(ids, 0.3, seed=7)
    frac = sum(v == "dpo" for v in split.values()) / len(ids)
    assert 0.27 <= frac <= 0.33
    assert split_prompts(list(reversed(ids)), 0.3, seed=7) == split
    bigger = split_prompts(ids + [f"new-{i}" for i in range(500)], 0.3, seed=7)
    assert {k: bigger[k] for k in ids} == split
    other = split_prompts(ids, 0.3, seed=8)
    assert other != split
    assert set(split_prompts(ids, 0.0, seed=1).values()) == {"sft"}
    assert set(split_prompts(ids, 1.0, seed=1).values()) == {"dpo"}
    with pytest.raises(ValueError, match="dpo_fraction must lie in"):
        split_prompts(ids, 1.5, seed=1)


def test_bad_inputs_named():
    bad = [dict(r) for r in TABLE[:3]]
    del bad[1]["reward"]
    with pytest.raises(ValueError, match="row 1: missing field 'reward'"):
        build_sft(bad, ALL_SFT)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['correct'\]"):
        build_sft(pa.Table.from_pylist(TABLE).drop_columns(["correct"]), ALL_SFT)

    bad = [dict(r) for r in TABLE[:3]]
    bad[2]["reward"] = float("nan")
    with pytest.raises(ValueError, match="row 2: field 'reward' is NaN"):
        build_dpo(bad, ALL_DPO)

    bad = [dict(r) for r in TABLE[:3]] + [dict(TABLE[1], response="again")]
    with pytest.raises(ValueError, match=r"row 3: duplicate \(prompt_id, source, sample_index\) = "
                                         r"\('p-open', 'alpha', 1\), first at row 1"):
        counts(bad, ALL_DPO)

    bad = [dict(r) for r in TABLE[6:9]]
    bad[1]["correct"] = None
    with pytest.raises(ValueError, match="row 1: field 'correct' must be a bool for a verifiable prompt"):
        build_sft(bad, ALL_SFT)

    bad = [dict(r) for r in TABLE[:3]]
    bad[0]["sample_index"] = "0"
    with pytest.raises(ValueError, match="row 0: field 'sample_index' must be an int"):
        build_sft(bad, ALL_SFT)

    with pytest.raises(ValueError, match="row 6: field 'prompt_id' = 'p-math' has no split"):
        build_sft(TABLE, {"p-open": "sft"})
    with pytest.raises(ValueError, match="min_gap .* must not exceed max_gap"):
        build_dpo(TABLE, ALL_DPO, min_gap=0.2, max_gap=0.1)
