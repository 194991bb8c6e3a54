"""Prepare's pure core: row formats, rejection reasons, rendering, spans, truncation."""

import pytest

from fusion_ray.chat_template import RowRejected, prepare_row, sample_id_of, to_messages


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models("qwen2", "deepseek"))


OPENAI = {"id": "a1", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a byte?"},
    {"role": "assistant", "content": "Eight bits."},
    {"role": "user", "content": "And a nibble?"},
    {"role": "assistant", "content": "Four bits."},
]}
SHAREGPT = {"conversations": [{"from": "human", "value": "What is a byte?"},
                              {"from": "gpt", "value": "Eight bits."}]}


def test_both_formats_normalise_to_the_same_messages():
    assert to_messages(SHAREGPT) == to_messages({"messages": OPENAI["messages"][1:3]})


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content: empty content"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "messages[0].content: content is not a string"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: unknown role 'wizard'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from: unknown role 'robot'"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": ["hello"]}, "messages[0] is not an object"),
    ({"text": "no chat here"}, "no 'messages' or 'conversations' field"),
    ([1, 2], "row is a list, not an object"),
])
def test_each_bad_row_is_rejected_with_its_reason(row, reason):
    with pytest.raises(RowRejected) as err:
        to_messages(row)
    assert str(err.value) == reason


def test_render_once_with_spans_covering_every_reply(tok):
    prep = prepare_row(OPENAI, tok, max_length=512)
    assert prep.sample_id == "a1" and not prep.truncated
    assert prep.text == tok.apply_chat_template(OPENAI["messages"], tokenize=False)
    replies = [prep.text[s:e] for s, e in zip(prep.span_starts, prep.span_ends)]
    assert len(replies) == 2
    assert replies[0].startswith("Eight bits.") and replies[1].startswith("Four bits.")
    assert all("What is" not in r and "nibble" not in r for r in replies)


def test_long_text_is_cut_at_a_token_boundary_and_flagged(tok):
    long = {"messages": [{"role": "user", "content": "Tell me."},
                         {"role": "assistant", "content": "word " * 400}]}
    prep = prepare_row(long, tok, max_length=64)
    assert prep.truncated
    assert len(tok(prep.text)["input_ids"]) <= 64
    assert prep.span_ends[-1] == len(prep.text)


def test_reply_beyond_max_length_is_rejected(tok):
    row = {"messages": [{"role": "user", "content": "word " * 300},
                        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RowRejected, match="no assistant text within max_length"):
        prepare_row(row, tok, max_length=32)


def test_sample_ids_are_stable_and_content_based():
    assert sample_id_of({"id": 7}) == "7"
    assert sample_id_of(SHAREGPT) == sample_id_of(dict(SHAREGPT))
    other = {"conversations": SHAREGPT["conversations"][:1] * 2}
    assert sample_id_of(other) != sample_id_of(SHAREGPT)
