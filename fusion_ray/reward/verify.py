"""Rule verifiers for the implicit-fusion reward stage: math answers and code run in a sandbox.

Math: `extract_answer` finds a response's final answer (a balanced `\\boxed{...}`, else the text
after the last "answer is" / "Answer:" / "####", else the last number), `normalize_answer`
puts it in a canonical form (numbers as exact fractions, so "0.50", ".5", "1/2" and
"\\frac{1}{2}" agree), and `math_correct` compares a response with a gold answer. No sympy:
symbolic answers that are not numbers are compared as normalised strings.

Code: `verify_code` pulls the code out of a chat response and `run_code` judges it against its
tests. By default (`isolation="bwrap"`) the candidate runs under bubblewrap in a sandbox of its
own and the tests in another, joined by a pipe that carries only plain data; the verdict is
reached from the tests' report, outside both (`reward/sandbox.py` says what the sandbox
isolates, `reward/judge.py` how the verdict is reached). Where bubblewrap cannot run,
`run_code` raises `SandboxUnavailable` with the reason in one line; the in-process guard it
replaced stays as `isolation="unsafe-in-process"` (`reward/guard.py`), for tests only.
"""

from __future__ import annotations

import re
from fractions import Fraction

from fusion_ray.reward.judge import Verdict, judge
from fusion_ray.reward.sandbox import SandboxLimits, SandboxSettings, SandboxUnavailable

__all__ = [
    "ISOLATIONS",
    "SandboxLimits",
    "SandboxSettings",
    "SandboxUnavailable",
    "Verdict",
    "extract_answer",
    "extract_code",
    "math_correct",
    "normalize_answer",
    "run_code",
    "verify_code",
]

# ---------------------------------------------------------------------------------------------
# Math answers
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER = re.compile(r"(?:answer\s+is|answer\s*:|####)", re.IGNORECASE)
_NUMBER = re.compile(r"[-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\frac(\d)(\d)$")
_SLASH = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def _balanced(text: str, open_at: int) -> str | None:
    """The text inside the brace at `open_at` up to its matching close, or None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer in a response, or None when it states none.

    A `\\boxed{...}` (the last one, braces balanced) wins; else the text after the last
    "answer is" / "Answer:" / "####" (up to the end of its line or sentence); else the last number.
    """
    for m in reversed(list(_BOXED.finditer(response))):
        inner = _balanced(response, m.end() - 1)
        if inner is not None and inner.strip():
            return inner.strip()
    markers = list(_MARKER.finditer(response))
    if markers:
        rest = response[markers[-1].end() :].lstrip(" \t:=").split("\n", 1)[0]
        rest = re.split(r"[.!?;](?:\s|$)", rest, maxsplit=1)[0].strip().strip("*").strip()
        if rest:
            return rest
    numbers = _NUMBER.findall(response)
    return numbers[-1].strip() if numbers else None


def _to_fraction(s: str) -> Fraction | None:
    """An exact value for a plain number, fraction or `\\frac`, or None."""
    for pattern in (_FRAC, _FRAC_SHORT):
        m = pattern.match(s)
        if m:
            try:
                value = Fraction(m.group(2)) / Fraction(m.group(3))
            except (ValueError, ZeroDivisionError):
                return None
            return -value if m.group(1) else value
    m = _SLASH.match(s)
    if m:
        try:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        except (ValueError, ZeroDivisionError):
            return None
    if _DECIMAL.match(s):
        return Fraction(s)
    return None


def normalize_answer(s: str) -> str:
    """A canonical form of an answer: numbers exact (`str(Fraction)`), other text de-formatted."""
    s = s.replace("\u2212", "-").replace("\u2013", "-").strip()
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_MACRO.sub(r"\1", s)
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(spacing, "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    while s.startswith("{") and s.endswith("}") and _balanced(s, 0) == s[1:-1]:
        s = s[1:-1]
    s = re.sub(r"^[A-Za-z]=", "", s)  # "x=5"
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    value = _to_fraction(s)
    return str(value) if value is not None else s


def math_correct(response: str, gold: str) -> bool:
    """Whether the response's final answer equals the gold answer (exactly, for numbers).

    The gold may be a bare answer or a worked solution ending in `\\boxed{}` / "#### n".
    """
    predicted = extract_answer(response)
    if predicted is None:
        return False
    gold_answer = gold
    if _BOXED.search(gold) or "####" in gold:
        gold_answer = extract_answer(gold) or gold
    a, b = normalize_answer(predicted), normalize_answer(gold_answer)
    return bool(a) and a == b


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------

ISOLATIONS = ("bwrap", "unsafe-in-process")


def run_code(code: str, tests: str, *, limits: SandboxLimits = SandboxLimits(), isolation: str = "bwrap",
             settings: SandboxSettings = SandboxSettings()) -> Verdict:
    """Judge `code` against `tests`: under bubblewrap, the verdict reached outside the candidate's
    sandbox (`reward/judge.py`); `isolation="unsafe-in-process"` runs the old in-process guard
    (`reward/guard.py`, tests only). Raises SandboxUnavailable when bubblewrap cannot run here."""
    if isolation == "bwrap":
        return judge(code, tests, limits, settings)
    if isolation == "unsafe-in-process":
        from fusion_ray.reward.guard import run_guarded

        return run_guarded(code, tests, limits=limits)
    raise ValueError(f"isolation {isolation!r}: expected one of {', '.join(ISOLATIONS)}")


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The code in a chat response: the last ```python block, else the last fenced block, else all."""
    blocks = _FENCE.findall(response)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return response


def verify_code(response: str, tests: str, limits: SandboxLimits = SandboxLimits(), *, isolation: str = "bwrap",
                settings: SandboxSettings = SandboxSettings()) -> Verdict:
    """Judge the code in a chat response against `tests` (see `run_code`)."""
    return run_code(extract_code(response), tests, limits=limits, isolation=isolation, settings=settings)
