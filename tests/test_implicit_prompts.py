"""Prompt corpora of implicit fusion: rows checked one by one, bad ones named by file, row and field."""

import json

import pytest

from fusion_ray.config import PromptCorpus
from fusion_ray.sample.prompts import BadPrompts, read_prompts


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_rows_become_one_table_with_chats_answers_and_sample_counts(tmp_path):
    math = write(tmp_path / "math.jsonl", [{"id": 1, "prompt": "What is 2 + 3?", "answer": 5},
                                           {"id": "m2", "messages": [{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "7 × 8?"}],
                                            "answer": "56"}])
    code = write(tmp_path / "code.jsonl", [{"id": "c1", "prompt": "Write f.", "tests": "assert f(1) == 2"}])
    table = read_prompts([PromptCorpus(path=math, domain="math", verify="math"),
                          PromptCorpus(path=code, domain="code", verify="code", samples=8)], n_default=5)
    rows = table.to_pylist()
    assert [r["prompt_id"] for r in rows] == ["1", "m2", "c1"]
    assert json.loads(rows[0]["messages"]) == [{"role": "user", "content": "What is 2 + 3?"}]
    assert json.loads(rows[1]["messages"])[0] == {"role": "system", "content": "Be brief."}
    assert [r["answer"] for r in rows] == ["5", "56", None]
    assert rows[2]["tests"] == "assert f(1) == 2" and rows[2]["verify"] == "code"
    assert [r["samples"] for r in rows] == [5, 5, 8]


def test_each_bad_row_is_named_by_file_row_and_field(tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"id": "ok", "prompt": "fine", "answer": "1"},
        {"prompt": "no id", "answer": "1"},
        {"id": "a", "answer": "1"},
        {"id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "answer": "1"},
        {"id": "c", "messages": [{"role": "robot", "content": "q"}], "answer": "1"},
        {"id": "d", "prompt": "math without a gold answer"},
        "{not json",
        [1, 2],
    ])
    with pytest.raises(BadPrompts) as err:
        read_prompts([PromptCorpus(path=path, verify="math")], n_default=2)
    text = str(err.value)
    assert "7 unusable row(s)" in text
    for row, field in ((1, "id"), (2, "messages: missing"), (3, "messages: the last turn must be the user's"),
                       (4, "messages.0"), (5, "answer"), (6, ""), (7, "expected a JSON object")):
        assert f"bad.jsonl row {row}: {field}" in text, (row, field, text)
    assert "row 0" not in text


def test_code_prompts_need_tests_and_ids_are_unique_over_corpora(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"id": "x", "prompt": "p"}])
    b = write(tmp_path / "b.jsonl", [{"id": "x", "prompt": "q", "tests": "assert True"},
                                     {"id": "y", "prompt": "r"}])
    with pytest.raises(BadPrompts) as err:
        read_prompts([PromptCorpus(path=a), PromptCorpus(path=b, verify="code")], n_default=1)
    text = str(err.value)
    assert "id 'x' repeated (first in implicit.prompts.0)" in text
    assert "b.jsonl row 1: tests: a code prompt needs its tests" in text


def test_an_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BadPrompts, match="implicit.prompts.0 .*: no prompts"):
        read_prompts([PromptCorpus(path=str(empty))], n_default=1)
