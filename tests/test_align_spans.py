"""Span transfer (align/spans.py): the pivot positions the 1-1 rule leaves out."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ray.align import offsets, project, spans

CHARS = "abceghimnoprtu "
WORD = [("i", "n"), ("in", "g"), (" ", "c"), (" c", "o"), (" co", "m"), (" com", "p"), (" comp", "u"),
        (" compu", "t"), ("e", "r"), (" ", "t"), (" t", "h"), (" th", "e"), (" ", "b")]
# source vocabulary: surfaces by id
S = ["a", " computing", " computer", " the", " b", " comput", "ing", "er", " co"]


def bpe(merges):
    """A real fast tokenizer: character BPE with these merges (no pre-tokenizer, no specials)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(CHARS)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=merges)))
    surf = [""] * len(vocab)
    for s, i in vocab.items():
        surf[i] = s
    return tok, surf


def row(ids, ends, topk_ids, topk_lp):
    return {"input_ids": np.array(ids), "offsets": np.array(ends), "loss_mask": np.ones(len(ids) - 1, bool),
            "topk_ids": np.array(topk_ids), "topk_logprobs": np.array(topk_lp, dtype=np.float32)}


def ends(surfaces, ids):
    return np.cumsum([len(surfaces[i]) for i in ids])


def pivot_row(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"]) - 1
    return row(enc["input_ids"], [e for _, e in enc["offset_mapping"]], [[0, 1, 2, 3]] * n,
               [[-1.0, -2.0, -3.0, -4.0]] * n)


def dist(out, n):
    """{pivot id: prob} of scored position n."""
    return {int(i): float(np.exp(v)) for i, v in zip(out["topk_ids"][n], out["topk_logprobs"][n], strict=True)
            if v > -np.inf}


def test_first_piece_is_the_pivots_own_first_token():
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    assert first(" computer") == surf.index(" comput")  # " comput" + "er"
    assert first("ing") == surf.index("ing")
    assert first(" thx") == surf.index(" th")
    assert first("\xe2\x80") == -1  # not UTF-8 text and no vocab prefix
    vmap = first.vocab_map(S, {0: 5})
    assert [surf[i] for i in vmap[1:]] == [" comput", " comput", " the", " b", " comput", "ing", "er", " co"]
    assert vmap[0] == 5, "specials are forced"


def test_split_word_positions_get_the_conditioned_source_distribution():
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    assert [surf[i] for i in pivot["input_ids"]] == ["a", " comput", "ing", " b"]
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[1, 2, 3], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    vmap = first.vocab_map(S, {})
    out = spans.transfer_spans(pivot, source, text, vmap, first, S, k=4)
    assert out["transferred"].tolist() == [True, True, True]
    assert out["kinds"].tolist() == [1, 2, 1]
    comput, ing, er, the = (surf.index(s) for s in (" comput", "ing", "er", " the"))
    # " comput…": the source's " computing" and " computer" both start with the pivot's " comput"
    assert dist(out, 0) == pytest.approx({comput: np.exp(-0.5) + np.exp(-1.5), the: np.exp(-2.0)}, rel=1e-5)
    # after " comput" is written: the candidates that continue it, conditioned on it
    kept = np.exp(-0.5) + np.exp(-1.5)
    assert dist(out, 1) == pytest.approx({ing: np.exp(-0.5) / kept, er: np.exp(-1.5) / kept}, rel=1e-5)
    # or with p(" comput") bounded by their mass plus the row's tail (the rest stays in the tail)
    z = kept + 1 - (kept + np.exp(-2.0))
    tail = spans.transfer_spans(pivot, source, text, vmap, first, S, k=4, prefix="tail")
    assert dist(tail, 1) == pytest.approx({ing: np.exp(-0.5) / z, er: np.exp(-1.5) / z}, rel=1e-5)
    skip = spans.transfer_spans(pivot, source, text, vmap, first, S, k=4, prefix="skip")
    assert skip["transferred"].tolist() == [True, False, True]
    # the 1-1 position gives what the 1-1 rule gives
    one = project.transfer(pivot, source, project.position_map(offsets.one_to_one(pivot["offsets"],
                                                                                    source["offsets"])), vmap, k=4)
    assert one["transferred"].tolist() == [False, False, True]
    assert dist(out, 2) == pytest.approx(dist(one, 2))


def test_candidates_the_pivot_would_not_split_there_are_dropped():
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    src = S + [" cub"]
    text = "a cub"
    pivot = pivot_row(tok, text)
    assert [surf[i] for i in pivot["input_ids"]] == ["a", " c", "u", "b"]
    assert first.after(" cub", 2) == surf.index("u")
    assert first.after(" computing", 2) == -1, "the pivot writes ' comput', never ' c' + 'o…'"
    assert first.after(" co", 0) == surf.index(" co")
    source = row([0, 9], ends(src, [0, 9]), [[1, 9, 8]], [[-0.9, -1.2, -2.5]])
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(src, {}), first, src, k=4, prefix="tail")
    tail = 1 - (np.exp(-0.9) + np.exp(-1.2) + np.exp(-2.5))
    # after " c": only " cub" goes on as the pivot would; " computing" and " co" do not
    assert dist(out, 1) == pytest.approx({surf.index("u"): np.exp(-1.2) / (np.exp(-1.2) + tail)}, rel=1e-5)


def test_a_longer_pivot_token_expands_the_gold_source_token():
    tok, surf = bpe(WORD + [(" comput", "ing")])
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    assert [surf[i] for i in pivot["input_ids"]] == ["a", " computing", " b"]
    source = row([0, 5, 6, 4], ends(S, [0, 5, 6, 4]), [[5, 3, 8], [6, 7, 3], [4, 0, 3]],
                 [[-0.4, -1.2, -2.5], [-0.1, -2.6, -4.0], [-0.2, -2.0, -3.0]])
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=5)
    assert out["kinds"].tolist() == [2, 1]
    computing, comput, the, co = (surf.index(s) for s in (" computing", " comput", " the", " co"))
    # p(" comput") · p(next | " comput"): "ing" completes the pivot token; " computer" and
    # " comput the" start with the pivot's " comput"; the other candidates map as they are
    assert dist(out, 0) == pytest.approx({computing: np.exp(-0.5), comput: np.exp(-3.0) + np.exp(-4.4),
                                          the: np.exp(-1.2), co: np.exp(-2.5)}, rel=1e-5)


def test_no_candidate_continuing_the_prefix_falls_back():
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[3, 4, 0], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4)
    assert out["transferred"].tolist() == [True, False, True]
    assert out["topk_ids"][1].tolist() == [0, 1, 2, 3], "the pivot's own distribution"
    hot = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4, fallback="onehot_next")
    assert dist(hot, 1) == {surf.index("ing"): 1.0}


def test_the_gold_source_token_joins_the_conditioned_candidates():
    """Conditioning on a written prefix with the gold token outside the top-k would teach a
    continuation that was not written with certainty; its exact log-prob (`gold_logprob`) joins."""
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    ing, er = surf.index("ing"), surf.index("er")
    # the top-k at "a" holds " computer" but not the gold " computing"
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[2, 3, 0], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    without = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4)
    assert dist(without, 1) == pytest.approx({er: 1.0}), "without the gold: 'er' for certain, and wrong"
    source["gold_logprob"] = np.array([-2.5, -0.3], dtype=np.float32)
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4)
    z = np.exp(-0.5) + np.exp(-2.5)
    assert dist(out, 1) == pytest.approx({er: np.exp(-0.5) / z, ing: np.exp(-2.5) / z}, rel=1e-5)
    assert dist(out, 2) == dist(without, 2), "positions without a prefix are left as they are"
    off = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4, gold=False)
    assert dist(off, 1) == pytest.approx({er: 1.0})
    # no candidate continues the prefix: the gold alone does (a one-hot on the written piece)
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[3, 4, 0], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    source["gold_logprob"] = np.array([-4.0, -0.3], dtype=np.float32)
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4)
    assert out["transferred"].tolist() == [True, True, True] and dist(out, 1) == pytest.approx({ing: 1.0})
    # and the expansion of a shorter gold token through the next position gets it too
    tok2, surf2 = bpe(WORD + [(" comput", "ing")])
    first2 = spans.FirstPiece(tok2, surf2)
    pivot2 = pivot_row(tok2, text)
    source2 = row([0, 5, 6, 4], ends(S, [0, 5, 6, 4]), [[5, 3, 8], [7, 3, 0], [4, 0, 3]],
                  [[-0.4, -1.2, -2.5], [-0.2, -2.6, -4.0], [-0.2, -2.0, -3.0]])
    source2["gold_logprob"] = np.array([-0.4, -3.0, -0.2], dtype=np.float32)
    out2 = spans.transfer_spans(pivot2, source2, text, first2.vocab_map(S, {}), first2, S, k=5)
    assert dist(out2, 0)[surf2.index(" computing")] == pytest.approx(np.exp(-3.4), rel=1e-5)


WORDS = ["a", " computing", " computer", " the", " b", " comput", " be", " bit", " rim"]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=2, max_size=8),
       cuts=st.lists(st.integers(1, 5), min_size=40, max_size=40), seed=st.integers(0, 10_000))
def test_spans_keep_the_one_to_one_positions_and_valid_distributions(words, cuts, seed):
    """Any source segmentation: 1-1 positions unchanged, more positions reached, mass ≤ 1."""
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "".join(words)
    pivot = pivot_row(tok, text)
    pieces, at = [], 0  # the source cuts the text into pieces of 1..5 chars
    for c in cuts:
        if at >= len(text):
            break
        pieces.append(text[at:at + c])
        at += c
    if at < len(text):
        pieces.append(text[at:])
    vocab = sorted(set(pieces) | set(S))
    ids = [vocab.index(p) for p in pieces]
    rng = np.random.default_rng(seed)
    n, k = len(ids) - 1, 4
    if n < 1 or len(pivot["input_ids"]) < 2:
        return
    topk = []
    for gold in ids[1:]:  # distinct ids per row, mostly with the gold first
        others = [int(i) for i in rng.permutation(len(vocab)) if i != gold]
        topk.append(([gold] + others[:k - 1]) if rng.random() < 0.7 else others[:k])
    probs = rng.dirichlet(np.ones(k + 1), n)[:, :k]
    source = row(ids, np.cumsum([len(p) for p in pieces]), topk, np.log(probs))
    vmap = first.vocab_map(vocab, {})
    out = spans.transfer_spans(pivot, source, text, vmap, first, vocab, k=k)
    one = project.transfer(pivot, source, project.position_map(offsets.one_to_one(pivot["offsets"],
                                                                                    source["offsets"])), vmap, k=k)
    assert np.all(out["transferred"][one["transferred"]])
    for pos in np.flatnonzero(one["transferred"]):
        assert dist(out, pos) == pytest.approx(dist(one, pos), rel=1e-5)
    mass = np.exp(out["topk_logprobs"].astype(np.float64)).sum(1)
    assert np.all(mass <= 1 + 1e-5)


@pytest.fixture(scope="module")
def spm_pivot(tmp_path_factory):
    """The demo's Mistral-family tokenizer: SentencePiece-style, with a dummy prefix ("x" → "▁x")."""
    from fusion_ray.align import vocab
    from fusion_ray.demo.tokenizers import build_tokenizer

    tok = build_tokenizer("mistral", 2000, tmp_path_factory.mktemp("spm"))
    return tok, vocab.surfaces(tok)


def test_a_sentencepiece_pivot_reads_strings_as_inside_a_text(spm_pivot):
    """Inside a text the pivot writes no dummy prefix: every token that follows another in the
    pivot's tokenization of a word is what FirstPiece says starts the rest of the word, and
    `after` finds it at its byte offset; nothing falls back."""
    tok, surf = spm_pivot
    first = spans.FirstPiece(tok, surf)
    assert first.lead is not None and first("x") != first(" x")
    checked = 0
    for word in ["computing", "processing", "understanding", "information", "dictionary", "universal",
                 "electricity", "transformation", "mountains", "beautifully"]:
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert "".join(surf[i] for i in ids) == " " + word
        at = 0
        for j, i in enumerate(ids):
            if j:
                rest = "".join(surf[x] for x in ids[j:])
                assert first(rest) == i, (word, surf[i], rest)
                assert first.after(" " + word, at) == i
                assert first.after(rest, 0) == i
                checked += 1
            at += len(surf[i])
    assert checked >= 10 and first.unspelled == 0


def test_spans_with_a_sentencepiece_pivot_keep_the_one_to_one_positions(spm_pivot):
    """The transfer with a SentencePiece pivot (dummy prefix): 1-1 positions as the 1-1 rule,
    split-word positions reached, every row a distribution."""
    from fusion_ray.align import vocab
    from fusion_ray.demo.tokenizers import build_tokenizer

    tok, surf = spm_pivot
    first = spans.FirstPiece(tok, surf)
    text = " the computer is processing the information about electricity"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"]) - 1
    pivot = row(enc["input_ids"], [e for _, e in enc["offset_mapping"]], [[0, 1, 2, 3]] * n,
                [[-1.0, -2.0, -3.0, -4.0]] * n)
    src_tok = build_tokenizer("gpt2", 600, __import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    s_surf = vocab.surfaces(src_tok)
    s_enc = src_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = s_enc["input_ids"]
    rng = np.random.default_rng(0)
    k = 4
    topk = [[g] + [int(x) for x in rng.choice(len(s_surf), k - 1, replace=False) if x != g][:k - 1]
            for g in ids[1:]]
    topk = [t if len(t) == k else t + [0] * (k - len(t)) for t in topk]
    source = row(ids, [e for _, e in s_enc["offset_mapping"]], topk, np.log(np.full((len(ids) - 1, k), 0.2)))
    vmap = first.vocab_map(s_surf, {})
    out = spans.transfer_spans(pivot, source, text, vmap, first, s_surf, k=k)
    one = project.transfer(pivot, source, project.position_map(offsets.one_to_one(pivot["offsets"],
                                                                                    source["offsets"])), vmap, k=k)
    assert np.all(out["transferred"][one["transferred"]])
    assert out["transferred"].sum() > one["transferred"].sum()
    for pos in np.flatnonzero(one["transferred"]):
        assert dist(out, pos) == pytest.approx(dist(one, pos), rel=1e-5)
    assert np.all(np.exp(out["topk_logprobs"].astype(np.float64)).sum(1) <= 1 + 1e-5)
    assert first.unspelled == 0


def test_the_exact_teacher_divides_by_the_collected_mass_and_keeps_the_tail():
    """`prefix: exact`: after " comput" is written, the source's stored extenders over its exact
    M(" comput"), each on the pivot token its reading starts with; the rest of the mass is tail,
    the written token gets exactly what the source gives it, and without stored entries the
    position is not transferred."""
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[1, 2, 3], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    log_m = np.log(0.9)  # the source's exact p(" comput…") at row 0: more than the top-k shows
    source.update({"cond_rows": np.array([0]), "cond_prefix": np.array([len(" comput")]),
                   "cond_mass": np.array([log_m], np.float32),
                   "cond_ids": np.array([[1, 2, 0]]), "cond_logprobs": np.array([[-0.5, -1.5, -np.inf]], np.float32)})
    vmap = first.vocab_map(S, {})
    out = spans.transfer_spans(pivot, source, text, vmap, first, S, k=4, prefix="exact")
    ing, er = surf.index("ing"), surf.index("er")
    assert out["transferred"].tolist() == [True, True, True] and out["kinds"].tolist() == [1, 2, 1]
    assert dist(out, 1) == pytest.approx({ing: np.exp(-0.5) / 0.9, er: np.exp(-1.5) / 0.9}, rel=1e-5)
    assert sum(dist(out, 1).values()) < 1 - 0.05  # the mass the top-k did not hold stays in the tail
    for key in ("cond_rows", "cond_prefix", "cond_mass", "cond_ids", "cond_logprobs"):
        source[key] = source[key][:0]
    none = spans.transfer_spans(pivot, source, text, vmap, first, S, k=4, prefix="exact")
    assert none["transferred"].tolist() == [True, False, True]
    del source["cond_rows"]
    with pytest.raises(ValueError, match="rerun collect"):
        spans.transfer_spans(pivot, source, text, vmap, first, S, k=4, prefix="exact")


def test_the_exact_teacher_expands_no_candidate():
    """Where the source token ends before the pivot token, the gold path alone is not expanded:
    the exact teacher leaves the position untransferred."""
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computer b"
    pivot = pivot_row(tok, text)
    src = ["a", " co", "mputer", " b", "mp"]  # the source: "a" " co" "mputer" " b"
    source = row([0, 1, 2, 3], np.cumsum([len(src[i]) for i in [0, 1, 2, 3]]),
                 [[1, 3, 0], [2, 4, 0], [3, 0, 1]], [[-0.2, -2.0, -3.0]] * 3)
    assert [surf[i] for i in pivot["input_ids"]] == ["a", " comput", "er", " b"]
    source.update({"cond_rows": np.zeros(0, int), "cond_prefix": np.zeros(0, int), "cond_mass": np.zeros(0),
                   "cond_ids": np.zeros((0, 3), int), "cond_logprobs": np.zeros((0, 3))})
    gold = spans.transfer_spans(pivot, source, text, first.vocab_map(src, {}), first, src, k=4)
    exact = spans.transfer_spans(pivot, source, text, first.vocab_map(src, {}), first, src, k=4, prefix="exact")
    expanded = [0]  # " comput" starts where " co" does and runs past it
    assert gold["kinds"][0] == 2 and gold["transferred"][0]
    assert expanded and not any(exact["transferred"][n] for n in expanded)


def test_the_label_only_ablation_is_one_hot_on_the_written_piece():
    tok, surf = bpe(WORD)
    first = spans.FirstPiece(tok, surf)
    text = "a computing b"
    pivot = pivot_row(tok, text)
    source = row([0, 1, 4], ends(S, [0, 1, 4]), [[2, 3, 0], [4, 3, 0]], [[-0.5, -1.5, -2.0], [-0.3, -1.0, -3.0]])
    out = spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}), first, S, k=4, prefix="label")
    assert dist(out, 1) == {surf.index("ing"): 1.0}  # " computing" was written: "ing", whatever the source said
    assert dist(out, 0) == pytest.approx(dist(spans.transfer_spans(pivot, source, text, first.vocab_map(S, {}),
                                                                   first, S, k=4), 0))
