"""Prompt corpora for implicit fusion: read, checked row by row, into one table.

A row is a JSON object (JSONL line or Parquet row) with
- `id` (string or integer; unique over all corpora of a run),
- `messages` (a chat: a list of `{role, content}` ending with a user turn) or `prompt`
  (a string: one user turn),
- `answer` (a string or number: the gold final answer; required where the corpus has
  `verify: math`) and `tests` (Python source run after the response's code; required where
  it has `verify: code`).

A row that breaks these rules stops the stage before any sampling, with the file, the row
and the field named (the first `MAX_SHOWN` problems). Rows are read through the same
bounded reader as `prepare` (lines over 8 MiB are refused without being read whole).
"""

from __future__ import annotations

import json

import pyarrow as pa

from fusion_ray.config import CorpusSpec, PromptCorpus
from fusion_ray.schema import PROMPTS

ROLES = ("system", "user", "assistant")
MAX_SHOWN = 10


class BadPrompts(ValueError):
    """Rows of a prompt corpus that cannot be used; the message names each (file, row, field)."""


def _messages(row: dict) -> list[dict] | str:
    """The row's chat, or why it has none."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "messages: expected a non-empty list of {role, content}"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or \
                    m.get("role") not in ROLES or not isinstance(m.get("content"), str) or not m["content"]:
                return f"messages.{j}: expected {{role: system|user|assistant, content: non-empty string}}"
        if msgs[-1]["role"] != "user":
            return "messages: the last turn must be the user's (the prompt the sources answer)"
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return [{"role": "user", "content": row["prompt"]}]
    return "messages: missing (or `prompt`: a non-empty string)"


def read_corpus(corpus: PromptCorpus, n_default: int) -> tuple[list[dict], list[str]]:
    """(rows of the PROMPTS schema, problems) of one corpus."""
    from fusion_ray.corpus import BadLine, iter_rows

    rows, problems = [], []
    spec = CorpusSpec(path=corpus.path, domain=corpus.domain, max_rows=corpus.max_rows)
    for file, i, row in iter_rows(spec):
        where = f"{file} row {i}"
        if isinstance(row, BadLine):
            problems.append(f"{where}: {row.reason}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        pid = row.get("id")
        if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
            problems.append(f"{where}: id: expected a non-empty string or an integer")
            continue
        msgs = _messages(row)
        if isinstance(msgs, str):
            problems.append(f"{where}: {msgs}")
            continue
        answer, tests = row.get("answer"), row.get("tests")
        if corpus.verify == "math" and (isinstance(answer, bool) or not isinstance(answer, str | int | float)
                                        or str(answer).strip() == ""):
            problems.append(f"{where}: answer: a math prompt needs its gold answer")
            continue
        if corpus.verify == "code" and (not isinstance(tests, str) or not tests.strip()):
            problems.append(f"{where}: tests: a code prompt needs its tests (Python source)")
            continue
        rows.append({"prompt_id": str(pid), "domain": corpus.domain, "verify": corpus.verify,
                     "messages": json.dumps(msgs, ensure_ascii=False),
                     "answer": None if answer is None else str(answer),
                     "tests": tests if isinstance(tests, str) else None,
                     "samples": corpus.samples or n_default})
    return rows, problems


def read_prompts(corpora: list[PromptCorpus], n_default: int, what: str = "implicit.prompts") -> pa.Table:
    """Every corpus's rows in one table (corpus order, then row order).

    Raises:
        BadPrompts: naming each bad row (file, row, field) and each repeated id (both places).
    """
    rows, problems, seen = [], [], {}
    for k, corpus in enumerate(corpora):
        got, bad = read_corpus(corpus, n_default)
        problems += bad
        if not got and not bad:
            problems.append(f"{what}.{k} ({corpus.path}): no prompts")
        for r in got:
            if r["prompt_id"] in seen:
                problems.append(f"{what}.{k} ({corpus.path}): id {r['prompt_id']!r} repeated "
                                f"(first in {what}.{seen[r['prompt_id']]})")
            else:
                seen[r["prompt_id"]] = k
                rows.append(r)
    if problems:
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise BadPrompts(f"{what}: {len(problems)} unusable row(s):\n  " + "\n  ".join(problems[:MAX_SHOWN]) + more)
    return pa.Table.from_pylist(rows, schema=PROMPTS)
