"""DTW alignment: hand-worked test vectors row by row, and equality with the plain reference."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_ray.align.dtw import dtw_align, dtw_align_reference

# source (Ġ marker), pivot (▁ marker), cost, pivot→source for fusellm, for fusechat2
VECTORS = [
    ("ĠHello Ġworld", "▁Hello ▁wor ld", 5, [[0], [1], [1]], [[0], [1], [1]]),
    ("ĠHel lo Ġworld", "▁Hello ▁world", 5, [[0, 1], [2]], [[0, 1], [2]]),
    ("Ġknowledge Ġfusion", "▁know ledge ▁fus ion", 15, [[0], [0], [1], [1]], [[0], [0], [1], [1]]),
    ("x", "y z", 2, [[0], [0]], [[0], [0]]),
    ("b bbb b", "bb a bb", 4, [[0], [0], [1, 2]], [[0, 1], [2], [2]]),
    # A hand count gives cost 5 here, but the path it gives, (0,0) (1,1) (2,2) (2,3), costs
    # 0 + ed(world, wor) + ed(!, ld) + 0 = 0 + 2 + 2 + 0 = 4, the minimum: 5 is a typo.
    ("ĠHello Ġworld !", "▁Hello ▁wor ld !", 4, [[0], [1], [2], [2]], [[0], [1], [2], [2]]),
]


@pytest.mark.parametrize("source, pivot, cost, fusellm, fusechat2", VECTORS)
def test_design_vectors(source, pivot, cost, fusellm, fusechat2):
    src, piv = source.split(), pivot.split()
    for tie, want in (("fusellm", fusellm), ("fusechat2", fusechat2)):
        got, total = dtw_align(src, piv, source_marker="Ġ", pivot_marker="▁", tie_break=tie,
                               return_cost=True)
        assert got == want, tie
        assert total == cost
        assert dtw_align_reference(src, piv, tie_break=tie) == (want, cost)


tokens = st.lists(st.text(alphabet="abĠ▁", min_size=0, max_size=4), min_size=1, max_size=9)


@settings(max_examples=200, deadline=None)
@given(tokens, tokens, st.sampled_from(["fusellm", "fusechat2"]))
def test_compiled_dtw_equals_the_plain_reference(source, pivot, tie):
    got = dtw_align(source, pivot, tie_break=tie, return_cost=True)
    assert got == dtw_align_reference(source, pivot, tie_break=tie)
    mapping = got[0]
    assert all(m == sorted(m) and m for m in mapping), "every pivot token gets sorted source positions"
    flat = [s for m in mapping for s in m]
    assert flat == sorted(flat) and set(flat) == set(range(len(source))), "monotone, covers the source"


def test_empty_sequences_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        dtw_align([], ["a"])
