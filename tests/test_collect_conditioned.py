"""The exact conditioned teacher's collect side (collect/conditioned.py) against brute force."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ray.collect import conditioned as C

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
