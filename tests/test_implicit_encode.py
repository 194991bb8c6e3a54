"""Chat + response → the target's tokens and the response-token mask (SFT/DPO rows)."""

import pytest
from transformers import AutoTokenizer

from fusion_ray.chat_template import encode_response


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models("qwen2", "gpt2"))


def test_only_the_last_responses_tokens_are_scored(tok):
    chat = [{"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "An earlier reply about cats."},
            {"role": "user", "content": "And three plus three?"}]
    ids, mask = encode_response(tok, chat, "Six. The answer is 6.", max_length=512)
    assert mask.shape == (len(ids) - 1,)
    scored = tok.decode(ids[1:][mask])
    assert scored.startswith("Six. The answer is 6.")
    assert "cats" not in scored and "three" not in scored  # earlier turns and the prompt are context
    text = tok.decode(ids)
    assert "An earlier reply about cats." in text and text.index("cats") < text.index("Six.")


def test_a_cut_row_keeps_what_fits_and_a_row_cut_before_its_response_is_none(tok):
    chat = [{"role": "user", "content": "word " * 40}]
    full_ids, full_mask = encode_response(tok, chat, "a long answer " * 20, max_length=4096)
    ids, mask = encode_response(tok, chat, "a long answer " * 20, max_length=len(full_ids) - 10)
    assert len(ids) == len(full_ids) - 10 and mask.sum() == full_mask[: len(ids) - 1].sum() > 0
    assert encode_response(tok, chat, "short", max_length=10) is None
