"""The chat evaluation's question file (`eval.chat.questions`), read and checked before any work.

One JSON object per line (JSONL). MT-Bench's `question.jsonl` reads as is:

    {"question_id": 81, "category": "writing", "turns": ["…", "…"], "reference": ["…", "…"]}

- `question_id`: an integer or a non-empty string (kept as a string); unique in the file.
- `category`: a string (absent: "general").
- `turns`: one or more user turns, each a string or an object with a string `content`
  (Arena-Hard's form); at most `eval.chat.max_turns` of them, each at most `MAX_TURN_CHARS`.
- `reference`: optional reference answers, a string per turn (at most one per turn).

Other keys are ignored. A bad row is an error naming the file, the row (line number) and the
field. The file is bounded before it is read (`MAX_FILE_BYTES`), and so is each line, so a wrong
path (a corpus, a binary file) fails at once instead of being parsed whole. Reading stops once
`max_questions` questions are in.
"""

from __future__ import annotations

import json
from typing import Any

MAX_FILE_BYTES = 64 * 2**20  # a question file is small: MT-Bench is 80 questions, Arena-Hard 500
MAX_TURN_CHARS = 64_000  # characters per turn (and per reference answer)
MAX_LINE_BYTES = 4 * 2**20  # one row


class QuestionFileError(ValueError):
    """A question file that cannot be used: names the file, and the row and field when one is at fault."""


def read_questions(ref: str, *, max_turns: int = 8, max_questions: int | None = None,
                   max_turn_chars: int = MAX_TURN_CHARS, max_bytes: int = MAX_FILE_BYTES) -> list[dict]:
    """The questions of a JSONL file (a local path, a store URI or a demo asset), checked.

    Returns:
        question dicts {"question_id": str, "category": str, "turns": [str, ...],
        "reference": [str, ...] | None}, in file order, at most `max_questions`.

    Raises:
        QuestionFileError: the file is missing, too large or empty, or a row is bad (naming the
            file, the line and the field).
    """
    from fusion_ray import locations

    if locations.kind(ref) == "hub":
        raise QuestionFileError(f"eval.chat.questions: {ref!r} looks like a hub dataset id; give a JSONL file "
                                "(a local path, a store URI or a demo asset)")
    try:
        path = locations.corpus_path(ref)
    except locations.LocationError as err:
        raise QuestionFileError(f"eval.chat.questions: {err}") from err
    return parse_questions(path, max_turns=max_turns, max_questions=max_questions, max_turn_chars=max_turn_chars,
                           max_bytes=max_bytes, name=ref)


def parse_questions(path: str, *, max_turns: int = 8, max_questions: int | None = None,
                    max_turn_chars: int = MAX_TURN_CHARS, max_bytes: int = MAX_FILE_BYTES,
                    name: str | None = None) -> list[dict]:
    """`read_questions` on a local file (`name`: how errors call it; default the path)."""
    from pathlib import Path

    name = name or path
    file = Path(path)
    if file.is_dir():
        raise QuestionFileError(f"question file {name}: a directory, not a JSONL file")
    try:
        size = file.stat().st_size
    except OSError as err:
        raise QuestionFileError(f"question file {name}: cannot be read: {err.strerror or err}") from err
    if size > max_bytes:
        raise QuestionFileError(f"question file {name}: {size:,} bytes, over the limit of {max_bytes:,} "
                                "(is it a question file?)")
    questions: list[dict] = []
    seen: dict[str, int] = {}
    with file.open("rb") as fh:
        for line_no, raw in enumerate(_lines(fh, name), start=1):
            if max_questions is not None and len(questions) >= max_questions:
                break
            if not raw.strip():
                continue
            where = f"question file {name}, line {line_no}"
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                raise QuestionFileError(f"{where}: not valid JSON ({err})") from None
            q = _question(row, where, max_turns, max_turn_chars)
            if q["question_id"] in seen:
                raise QuestionFileError(f"{where}: question_id {q['question_id']!r} repeats line "
                                        f"{seen[q['question_id']]}")
            seen[q["question_id"]] = line_no
            questions.append(q)
    if not questions:
        raise QuestionFileError(f"question file {name}: no questions")
    return questions


def _lines(fh, name: str):
    """The file's lines, each bounded (a file without newlines is not read whole into one line)."""
    line_no = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES:
            raise QuestionFileError(f"question file {name}, line {line_no}: longer than {MAX_LINE_BYTES:,} bytes")
        yield raw


def _question(row: Any, where: str, max_turns: int, max_turn_chars: int) -> dict:
    if not isinstance(row, dict):
        raise QuestionFileError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    qid = row.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or (isinstance(qid, str) and not qid.strip()):
        raise QuestionFileError(f"{where}: field 'question_id' must be an integer or a non-empty string, "
                                f"got {qid!r}")
    category = row.get("category", "general")
    if not isinstance(category, str):
        raise QuestionFileError(f"{where}: field 'category' must be a string, got {type(category).__name__}")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise QuestionFileError(f"{where}: field 'turns' must be a non-empty list of strings")
    if len(turns) > max_turns:
        raise QuestionFileError(f"{where}: field 'turns' has {len(turns)} turns, over eval.chat.max_turns "
                                f"({max_turns})")
    texts = [_text(t, f"{where}: field 'turns[{i}]'", max_turn_chars) for i, t in enumerate(turns)]
    reference = row.get("reference")
    if reference is not None:
        if not isinstance(reference, list) or len(reference) > len(texts):
            raise QuestionFileError(f"{where}: field 'reference' must be a list of strings, at most one per turn "
                                    f"({len(texts)})")
        reference = [_text(r, f"{where}: field 'reference[{i}]'", max_turn_chars, empty=True)
                     for i, r in enumerate(reference)]
    return {"question_id": str(qid), "category": category, "turns": texts, "reference": reference}


def _text(value: Any, where: str, max_chars: int, empty: bool = False) -> str:
    if isinstance(value, dict) and "content" in value:  # Arena-Hard: {"content": "…"}
        value = value["content"]
    if not isinstance(value, str) or not (empty or value.strip()):
        raise QuestionFileError(f"{where} must be a {'' if empty else 'non-empty '}string")
    if len(value) > max_chars:
        raise QuestionFileError(f"{where} has {len(value):,} characters, over the limit of {max_chars:,}")
    return value
