"""Alignment core: offset groups, the transfer of distributions, vocabulary maps."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ray import distributions
from fusion_ray.align import offsets, project, vocab


def ends_of(pieces):
    return np.cumsum([len(p) for p in pieces])


def test_offset_groups_and_one_to_one():
    pivot = ["▁know", "ledge", "▁is", "▁power"]  # ends 5, 10, 13, 19
    source = ["Ġknowledge", "Ġis", "Ġpow", "er"]  # ends 10, 13, 17, 19
    p, s = ends_of(pivot), ends_of(source)
    pg, sg = offsets.groups(p, s)
    assert pg.tolist() == [0, 0, 1, 2] and sg.tolist() == [0, 1, 2, 2]
    assert offsets.one_to_one(p, s).tolist() == [-1, -1, 1, -1]
    assert offsets.pivot_to_source(p, s) == [[0], [0], [1], [2, 3]]


def test_byte_fallback_pieces_close_only_at_their_last_piece():
    p = np.array([1, 2, 3])  # "a", "€", "b" (chars)
    s = np.array([1, 2, 2, 2, 3])  # "a", 3 byte pieces of "€", "b"
    assert offsets.closing(s).tolist() == [True, False, False, True, True]
    assert offsets.one_to_one(p, s).tolist() == [0, -1, 4]
    assert offsets.pivot_to_source(p, s) == [[0], [1, 2, 3], [4]]


def test_offsets_meet_only_when_consistent():
    assert offsets.meet(np.array([2, 5]), np.array([1, 5]), 5)
    assert not offsets.meet(np.array([2, 5]), np.array([1, 4]), 5)
    assert not offsets.meet(np.array([2, 5]), np.array([3, 1, 5]), 5)


@st.composite
def two_segmentations(draw):
    n_chars = draw(st.integers(1, 40))
    cuts = [draw(st.sets(st.integers(1, n_chars - 1), max_size=n_chars)) if n_chars > 1 else set()
            for _ in range(2)]
    return [np.array(sorted(c | {n_chars})) for c in cuts]


@settings(max_examples=300, deadline=None)
@given(two_segmentations())
def test_groups_cover_both_sequences_in_order(pair):
    p, s = pair
    mapping = offsets.pivot_to_source(p, s)
    flat = [i for m in mapping for i in m]
    assert sorted(set(flat)) == list(range(len(s))), "every source token is in a group"
    assert all(m for m in mapping), "every pivot token is in a group"
    assert all(a[0] >= b[0] for a, b in zip(mapping[1:], mapping[:-1])), "groups are in order"
    o2o = offsets.one_to_one(p, s)
    for j, i in enumerate(o2o):  # 1-1 pairs cover exactly the same span
        if i >= 0:
            assert p[j] == s[i] and (p[j - 1] if j else 0) == (s[i - 1] if i else 0)


def test_position_map_shifts_to_next_token_semantics():
    assert project.position_map(np.array([0, -1, 2, 3])).tolist() == [-1, 1, 2]


def test_one_to_one_from_dtw_groups():
    assert project.one_to_one_from_groups([[0], [0], [1], [2, 3]], 4).tolist() == [-1, -1, 1, -1]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_merged_probabilities_are_valid_and_never_exceed_one(p, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(p, 30)) * 3
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-logp, axis=1)[:, :k]
    vmap = rng.integers(-1, 7, size=30)  # many-to-one, some unmapped
    ids, lp = distributions.merge_duplicates(vmap[top], np.take_along_axis(logp, top, 1), k)
    assert ids.shape == (p, k) and ids.min() >= 0 and ids.max() < 7, "valid pivot ids"
    mass = np.exp(lp.astype(np.float64)).sum(1)
    assert np.all(mass <= 1 + 1e-6)
    for row in range(p):  # the merge keeps the mapped mass exactly
        want = sum(np.exp(logp[row, t]) for t in top[row] if vmap[t] >= 0)
        assert mass[row] == pytest.approx(want, rel=1e-5)
        live = ids[row][np.isfinite(lp[row])]
        assert len(set(live.tolist())) == len(live), "no duplicate ids left"


def _row(ids, topk_ids, topk_lp, mask):
    return {"input_ids": np.array(ids), "topk_ids": np.array(topk_ids), "topk_logprobs": np.array(topk_lp),
            "loss_mask": np.array(mask)}


def test_transfer_with_pivot_and_onehot_fallbacks():
    pivot = _row([5, 6, 7, 8], [[1, 2], [3, 4], [5, 6]], [[-0.1, -3], [-0.2, -2], [-0.3, -1.5]],
                 [False, True, True])
    source = _row([9, 9, 9], [[0, 1], [1, 0]], [[-0.5, -1.0], [-0.7, -0.9]], [True, True])
    pos_map = np.array([-1, 0, -1])  # pivot position 1 ← source position 0; position 2 has none
    vmap = np.array([4, 4])  # both source ids map to pivot id 4: merged
    out = project.transfer(pivot, source, pos_map, vmap, k=2)
    assert out["transferred"].tolist() == [True, False]
    assert out["topk_ids"][0].tolist()[0] == 4
    assert out["topk_logprobs"][0][0] == pytest.approx(np.logaddexp(-0.5, -1.0), abs=1e-6)
    assert out["topk_logprobs"][0][1] == -np.inf
    assert out["topk_ids"][1].tolist() == [5, 6], "fallback = the pivot's own distribution"
    hot = project.transfer(pivot, source, pos_map, vmap, k=2, fallback="onehot_next")
    assert hot["topk_ids"][1].tolist()[0] == 8 and hot["topk_logprobs"][1][0] == 0.0


def test_surfaces_and_maps_across_real_families(tiny_models):
    from transformers import AutoTokenizer

    gpt = AutoTokenizer.from_pretrained(tiny_models("gpt2", "gpt2"))
    mis = AutoTokenizer.from_pretrained(tiny_models("mistral", "mistral"))
    g, m = vocab.surfaces(gpt), vocab.surfaces(mis)
    assert vocab.space_marker(gpt) == "Ġ" and vocab.space_marker(mis) == "▁"
    assert g[gpt.convert_tokens_to_ids("Ġthe")] == " the" == m[mis.convert_tokens_to_ids("▁the")]
    assert g[gpt.convert_tokens_to_ids("Ċ")] == "\n" == m[mis.convert_tokens_to_ids("<0x0A>")]
    ex = vocab.exact_map(m, g)
    assert ex[mis.convert_tokens_to_ids("▁the")] == gpt.convert_tokens_to_ids("Ġthe")
    mined = vocab.mined_map(m, g)
    assert mined.min() >= 0 and np.all(mined[ex >= 0] == ex[ex >= 0])
    for i in np.flatnonzero(ex < 0)[:20]:  # an edit-distance minimum, lowest id on ties
        d = [vocab.Levenshtein.distance(m[i], t) for t in g]
        assert mined[i] == int(np.argmin(d))


def test_statistics_map_scoring_rule():
    source = ["knowledge", "cat", "zzz", "<eos>"]
    pivot = ["know", "ledge", "dog", "cat", "<eos>"]
    pairs = [(0, 0), (1, 0), (1, 0), (3, 1), (2, 1), (2, 1), (2, 1)]  # (pivot, source) aligned
    counts = vocab.count_pairs(np.array([p for p, _ in pairs]), np.array([s for _, s in pairs]), 4)
    out = vocab.statistics_map(vocab.merge_counts([counts[:2], counts[2:]]), source, pivot,
                               source_vocab=4, specials={3: 4})
    # knowledge: know = 5·0.1·σ(1), ledge = 4·0.1·σ(2) → ledge; cat: cat = 0 beats dog
    assert out.tolist() == [1, 3, -1, 4]
    assert vocab.statistics_map(counts, source, pivot, source_vocab=4, specials={}, unseen_to=2)[2] == 2
    # a surface the pivot has wins over the counts: "dog" co-aligned only with "cat" → "dog"
    dog = vocab.count_pairs(np.array([3, 3]), np.array([0, 0]), 1)
    assert vocab.statistics_map(dog, ["dog"], pivot, source_vocab=1, specials={}).tolist() == [2]


def test_dtw_is_used_only_where_offsets_do_not_meet():
    calls = []

    def dtw():
        calls.append(1)
        return [[0], [0], [1]]  # pivot tokens 0,1 ← source 0; pivot 2 ← source 1

    good, method = project.align_positions(np.array([2, 4, 6]), np.array([4, 6]), 6, dtw)
    assert method == "offsets" and not calls and good.tolist() == [-1, 0]
    bad, method = project.align_positions(np.array([2, 4, 6]), np.array([4, 7]), 6, dtw)
    assert method == "dtw" and calls == [1] and bad.tolist() == [-1, 0]
    none, method = project.align_positions(np.array([2, 4, 6]), np.array([4, 7]), 6, None)
    assert method == "none" and none.tolist() == [-1, -1]
