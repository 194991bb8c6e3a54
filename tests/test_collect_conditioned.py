"""The exact conditioned teacher's collect side (engines/conditioned.py) against brute force."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ray.engines import conditioned as C

ALPHABET = "ab c\xe2\x80"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(ALPHABET, min_size=0, max_size=5), min_size=1, max_size=60),
       st.text(ALPHABET, max_size=4), st.lists(st.integers(0, 59), max_size=5))
def test_extenders_are_exactly_the_tokens_that_strictly_extend_the_prefix(surfaces, u, exclude):
    index = C.PrefixIndex(surfaces, exclude)
    want = sorted(i for i, s in enumerate(surfaces)
                  if s and i not in set(exclude) and s.startswith(u) and len(s) > len(u))
    assert sorted(index.extenders(u).tolist()) == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=3, max_size=40, unique=True),
       st.lists(st.text(ALPHABET, max_size=3), min_size=1, max_size=6), st.integers(1, 5), st.integers(0, 99))
def test_masses_are_the_log_sum_and_top_k_of_the_extenders(surfaces, prefixes, k, seed):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(len(prefixes), len(surfaces), generator=g) * 3, -1)
    index = C.PrefixIndex(surfaces)
    mass, ids, lps = C.masses(logp, prefixes, index, k)
    for i, u in enumerate(prefixes):
        ext = [j for j, s in enumerate(surfaces) if s.startswith(u) and len(s) > len(u)]
        if not ext:
            assert mass[i] == -np.inf and np.all(lps[i] == -np.inf)
            continue
        vals = logp[i, ext].double()
        assert mass[i] == pytest.approx(float(torch.logsumexp(vals, 0)), abs=1e-5)
        want = sorted(vals.tolist(), reverse=True)[:k]
        got = [v for v in lps[i].tolist() if v > -np.inf]
        assert got == pytest.approx(want, abs=1e-5)
        assert all(surfaces[j].startswith(u) and len(surfaces[j]) > len(u) for j in ids[i, :len(got)])
        assert all(float(logp[i, j]) == pytest.approx(v, abs=1e-5) for j, v in zip(ids[i], got))
        assert mass[i] >= max(got) - 1e-6  # M(u) holds every extender, the top ones too


def test_requests_are_the_pivot_boundaries_strictly_inside_source_tokens():
    text = " the computing cat"
    # source: " the" " computing" " cat"; pivot: " the" " comput" "ing" " ca" "t"
    surfaces = {0: "<s>", 1: " the", 2: " computing", 3: " cat"}
    source_ids = [0, 1, 2, 3]
    source_ends = np.array([0, 4, 14, 18])
    pivot_ends = np.array([0, 4, 11, 14, 17, 18])
    rows = np.arange(3)
    got_rows, prefixes = C.requests(text, source_ids, source_ends, surfaces, pivot_ends, rows)
    assert got_rows.tolist() == [1, 2] and prefixes == [" comput", " ca"]
    # positions not stored make no request; a token that is not its text makes none
    assert C.requests(text, source_ids, source_ends, surfaces, pivot_ends, np.array([0, -1, 2]))[1] == [" ca"]
    odd = {**surfaces, 2: " COMPUTING"}
    assert C.requests(text, source_ids, source_ends, odd, pivot_ends, rows)[1] == [" ca"]


def test_a_multibyte_prefix_is_written_in_bytes():
    text = " caf\u00e9s"
    surfaces = {0: "<s>", 1: C.text_bytes(text, 0, 6)}
    rows, prefixes = C.requests(text, [0, 1], np.array([0, 6]), surfaces, np.array([0, 5, 6]), np.arange(1))
    assert prefixes == [" caf\xc3\xa9"] and rows.tolist() == [0]


# --- the engines: HF logits and vLLM hidden states give the same entries, equal to brute force --

@pytest.fixture(scope="module")
def pair(tiny_models):
    """A source (GPT-2-family tokenizer) and the pivot's tokenizer (DeepSeek family), a text each."""
    from helpers import chat_rows

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.align import vocab

    source = tiny_models("gpt2", "gpt2", vocab_size=600)
    s_tok = tokenizers.from_dir(source)
    p_tok = tokenizers.from_dir(tiny_models("qwen2", "deepseek"))
    texts = [s_tok.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(4)]
    surfaces = vocab.surfaces(s_tok)
    index = C.PrefixIndex(surfaces, s_tok.all_special_ids)
    seqs, reqs = [], []
    for text in texts:
        s = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        p = p_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = np.array([e for _, e in s["offset_mapping"]])
        rows, prefixes = C.requests(text, s["input_ids"], ends, surfaces,
                                    np.array([e for _, e in p["offset_mapping"]]), np.arange(len(ends) - 1))
        seqs.append(s["input_ids"])
        reqs.append((rows, prefixes))
    assert sum(len(r) for r, _ in reqs) > 10, "the tokenizers split words differently somewhere"
    return source, seqs, reqs, index


def brute_force(model_dir, seq, req, index, k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    rows, prefixes = req
    return C.masses(logp[torch.as_tensor(rows)], prefixes, index, k), logp


def test_hf_engine_returns_the_exact_conditioned_entries(pair):
    from fusion_ray.engines import scoring as engines

    source, seqs, reqs, index = pair
    out = engines.HFEngine(str(source), dtype="float32").score(seqs, 5, cond=reqs, index=index)
    for seq, req, scored in zip(seqs, reqs, out, strict=True):
        (mass, ids, lps), _ = brute_force(source, seq, req, index, 5)
        got_mass, got_ids, got_lps = scored[3]
        assert np.allclose(got_mass, mass, atol=1e-4) and np.allclose(got_lps, lps, atol=1e-4)
        assert np.all(got_mass <= 1e-6) and np.all(got_mass >= got_lps.max(1) - 1e-5)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_vllm_hidden_state_engine_matches_hf(pair):
    """vLLM as a pooling model + our output layer: the same top-k, gold and conditioned entries
    as the transformers forward."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import glob
    from pathlib import Path

    from fusion_ray.engines import scoring as engines

    source, seqs, reqs, index = pair
    hf = engines.HFEngine(str(source), dtype="float32").score(seqs, 5, cond=reqs, index=index)
    before = set(glob.glob("/dev/shm/*"))
    engine = engines.VLLMHiddenEngine(str(source), k=5, dtype="float32", max_model_len=1024, chunk_rows=7)
    try:
        vl = engine.score(seqs, 5, cond=reqs, index=index)
    finally:
        engine.close()
        for leftover in set(glob.glob("/dev/shm/*")) - before:
            Path(leftover).unlink(missing_ok=True)
    for a, b in zip(hf, vl, strict=True):
        assert np.mean(a[0] == b[0]) > 0.99  # ids (ties may order apart)
        assert np.allclose(a[1], b[1], atol=1e-4) and np.allclose(a[2], b[2], atol=1e-4)
        assert np.allclose(a[3][0], b[3][0], atol=1e-4) and np.allclose(a[3][2], b[3][2], atol=1e-4)


# --- the stages: collect stores the entries, align conditions with them -------------------------

@pytest.mark.integration
@pytest.mark.timeout(600)
def test_collect_and_align_with_the_exact_teacher(tiny_models, tmp_path, ray_local):
    """`align.prefix: exact` end to end on local Ray (hf engine): the source's logits/ rows hold
    the conditioned entries, the pivot's do not, and align conditions with them: every teacher
    row is a distribution, and at the conditioned positions the mass on each pivot token is the
    source's exact conditional probability of the tokens it stands for (≤ 1 in all)."""
    import pyarrow.parquet as pq
    from helpers import chat_rows, make_config, write_jsonl

    from fusion_ray import io, schema
    from fusion_ray.align import stage as align
    from fusion_ray.collect import stage as collect
    from fusion_ray.prepare import stage as prepare

    corpus = write_jsonl(tmp_path / "c.jsonl", chat_rows(8))
    cfg = make_config(tmp_path / "w", tiny_models("qwen2", "deepseek"), {"gpt": tiny_models("gpt2", "gpt2")},
                      [corpus], align={"positions": "spans", "vocab_map": "first_piece", "prefix": "exact"})
    quiet = lambda *_: None  # noqa: E731
    prepare.run(cfg, log=quiet)
    collect.run(cfg, log=quiet)
    src = io.read_table(io.list_files(cfg.stage_dir("collect", "gpt"))[0])
    schema.check_table(src, "conditioned", "gpt")
    n_cond = sum(len(x) for x in src.column("cond_rows").to_pylist())
    assert n_cond > 0, n_cond
    piv = io.read_table(io.list_files(cfg.stage_dir("collect", "pivot"))[0])
    assert "cond_rows" not in piv.column_names
    masses = np.concatenate([np.asarray(x, np.float64) for x in src.column("cond_mass").to_pylist()])
    assert np.all(masses <= 1e-6) and np.isfinite(masses).all()
    align.run(cfg, log=quiet)
    manifest = io.read_manifest(cfg.stage_dir("align", "gpt"))
    assert manifest["extra"]["transferred_fraction"] > 0.5
    table = pq.read_table(io.list_files(cfg.stage_dir("align", "gpt"))[0])
    for lps in table.column("topk_logprobs").to_pylist():
        total = np.exp(np.asarray(lps, np.float64)).sum(1)
        assert np.all(total <= 1 + 2e-3)


@pytest.mark.parametrize("prefix", ["exact", "renormalize", "label"])
def test_the_exact_teacher_never_gives_the_written_piece_more_than_the_source_does(pair, tiny_models, prefix):
    """At every pivot position inside a source token (the pivot wrote u of it), the exact teacher's
    probability of the pivot token g that comes next is at most the source's own probability, from
    its full distribution, that the text goes on with g after u:
    Σ_{s starts with u + g} p(s) / Σ_{s extends u} p(s). The gold-inserting teacher (`renormalize`)
    and the label-only ablation break it at some positions of the same texts."""
    from helpers import chat_rows
    from transformers import AutoModelForCausalLM

    from fusion_ray import tokenizer as tokenizers
    from fusion_ray.align import spans, vocab
    from fusion_ray.engines import scoring as engines

    source, seqs, reqs, index = pair
    s_tok = tokenizers.from_dir(source)
    p_tok = tokenizers.from_dir(tiny_models("qwen2", "deepseek"))
    s_surf, p_surf = vocab.surfaces(s_tok), vocab.surfaces(p_tok)
    specials = set(s_tok.all_special_ids)
    first = spans.FirstPiece(p_tok, p_surf)
    first_map = first.vocab_map(s_surf, {})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    scored = engines.HFEngine(str(source), dtype="float32").score(seqs, 5, cond=reqs, index=index)
    over = []
    for r, seq, (rows, prefixes), out in zip(chat_rows(4), seqs, reqs, scored, strict=True):
        text = s_tok.apply_chat_template(r["messages"], tokenize=False)
        s = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        p = p_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert list(s["input_ids"]) == list(seq)
        s_ends = np.array([e for _, e in s["offset_mapping"]])
        p_ends = np.array([e for _, e in p["offset_mapping"]])
        n = len(seq) - 1
        mass, c_ids, c_lps = out[3]
        src = {"input_ids": np.array(seq), "offsets": s_ends, "loss_mask": np.ones(n, bool),
               "topk_ids": out[0], "topk_logprobs": out[1], "gold_logprob": out[2],
               "cond_rows": np.asarray(rows), "cond_prefix": np.array([len(u) for u in prefixes]),
               "cond_mass": mass, "cond_ids": c_ids, "cond_logprobs": c_lps}
        m = len(p_ends) - 1
        piv = {"input_ids": np.array(p["input_ids"]), "offsets": p_ends, "loss_mask": np.ones(m, bool),
               "topk_ids": np.zeros((m, 5), int), "topk_logprobs": np.full((m, 5), -np.inf, np.float32)}
        got = spans.transfer_spans(piv, src, text, first_map, first, s_surf, k=5, prefix=prefix)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1).numpy()
        for pos in np.flatnonzero(got["kinds"] == 2):
            c = p_ends[pos]
            j = int(np.searchsorted(s_ends, c, side="right"))  # the source token the pivot is inside
            u = text[int(s_ends[j - 1]):int(c)].encode("utf-8").decode("latin-1")  # written prefix, as surfaces
            g = int(p["input_ids"][pos + 1])
            written = u + p_surf[g]
            ext = [t for t, x in enumerate(s_surf) if t not in specials and x.startswith(u) and len(x) > len(u)]
            on = [t for t in ext if s_surf[t].startswith(written)]
            bound = np.exp(np.logaddexp.reduce(logp[j - 1, on])) / np.exp(np.logaddexp.reduce(logp[j - 1, ext])) \
                if on else 0.0
            q = sum(np.exp(float(v)) for i, v in zip(got["topk_ids"][pos], got["topk_logprobs"][pos], strict=True)
                    if i == g and v > -np.inf)
            over.append(q > bound + 1e-4)
    assert len(over) > 10, len(over)
    if prefix == "exact":
        assert not any(over), f"{sum(over)} of {len(over)} positions"
    else:
        assert sum(over) >= 3, f"{sum(over)} of {len(over)} positions"
