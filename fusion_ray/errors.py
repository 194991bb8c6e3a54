"""`ConfigError` and the one-line formatting of validation errors.

Its own module, so that everything that validates input (the pipeline config, merge specs,
cluster configs) can raise it without importing `fusion_ray.config`. Imports pydantic only.
"""

from __future__ import annotations

import builtins
import datetime
import reprlib
from typing import Any

from pydantic import ValidationError

MAX_ERRORS_SHOWN = 40  # lines of a ConfigError; the rest are counted


class ConfigError(ValueError):
    """A configuration that cannot be used; `errors` holds one line per bad field.

    One error reads as one line (`source: error`); several as a count and one line each.
    """

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        if len(errors) == 1:
            super().__init__(f"{source}: {errors[0]}")
            return
        shown = errors[:MAX_ERRORS_SHOWN]
        more = [f"... and {len(errors) - len(shown)} more"] if len(errors) > len(shown) else []
        super().__init__(f"{source}: {len(errors)} invalid field(s)\n  " + "\n  ".join(shown + more))


def one_line(text: str, limit: int = 200) -> str:
    """`text` with its whitespace runs as single spaces, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoundedRepr(reprlib.Repr):
    """`repr` that never builds more than a few hundred characters, whatever the value: a
    few items of each container, a few levels deep, the start of each string; other objects
    by type name only (their own `__repr__` could build anything)."""

    _PLAIN = (float, bool, type(None), complex, datetime.date, datetime.time, datetime.timedelta)

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 80
        self.maxlong = 40
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxdict = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a huge int is slow, past 4300 digits an error
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return builtins.repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_instance(self, x: Any, level: int) -> str:
        if isinstance(x, self._PLAIN):
            return builtins.repr(x)[: self.maxother]
        return f"<{type(x).__name__}>"


bounded_repr = _BoundedRepr().repr

def format_errors(err: ValidationError, moved: dict[str, str] | None = None) -> list[str]:
    """One line per invalid field: dotted path, message, offending value (a bounded repr).

    Args:
        moved: dotted key → the key that replaced it, named where an old key is given.
    """
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(one_line(str(p), 80) for p in e["loc"]) or "(top level)"
        msg = one_line(e["msg"].removeprefix("Value error, "), 300)
        if e["type"] == "extra_forbidden":
            new = (moved or {}).get(loc)
            msg = f"unknown key: moved to {new}" if new else "unknown key"
        shown = e["type"] != "missing" and not isinstance(e["input"], dict)
        value = f" (got {one_line(bounded_repr(e['input']), 300)})" if shown else ""
        lines.append(f"{loc}: {msg}{value}")
    return lines


# --- a failed stage, in one line ---------------------------------------------------------------

# Errors that bad input causes: the same input fails the same way on every try, so they are
# never retried (trainer/fit.py's failure policy) and read as one line (`describe`).
INPUT_ERROR_NAMES = frozenset({
    "FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError", "PermissionError",
    "ConfigError", "LocationError", "ValidationError", "ArrowInvalid", "ArrowTypeError", "ArrowKeyError",
    "SchemaError", "InputError", "UnicodeDecodeError", "JSONDecodeError"})


class InputError(ValueError):
    """Input that cannot be used (an incomplete stage output, a row of the wrong shape): the
    same on every try."""


class StageFailed(RuntimeError):
    """A stage ended in an error: `str()` is one line naming the stage, the part (arm, source,
    model) where known, the root cause, and the file holding the whole traceback."""

    def __init__(self, stage: str, part: str | None, cause: str, log_path: str | None):
        self.stage, self.part, self.cause, self.log_path = stage, part, cause, log_path
        where = f" ({part})" if part else ""
        tail = f"; traceback in {log_path}" if log_path else ""
        super().__init__(f"[{stage}] failed{where}: {cause}{tail}")

    def __reduce__(self):
        return (self.__class__, (self.stage, self.part, self.cause, self.log_path))


PART_ATTR = "fusion_ray_part"  # set on an exception by `parallel.run_parts`: the part it came from


def root_cause(err: BaseException) -> BaseException:
    """The exception under Ray's and Ray Train's wrappers: a worker's own error inside a
    `WorkerGroupError`, a task's inside a `RayTaskError`, a UDF's inside Ray Data's
    `UserCodeException`. Read by attributes, so this module imports no Ray."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            err = failures[min(failures)]
        elif isinstance(getattr(err, "_base_exc", None), BaseException):  # UserExceptionWithTraceback
            err = err._base_exc
        elif isinstance(getattr(err, "controller_failure", None), BaseException):
            err = err.controller_failure
        elif type(err).__name__.startswith("RayTaskError") and isinstance(getattr(err, "cause", None), BaseException):
            err = err.cause
        elif type(err).__name__ in ("UserCodeException", "TrainingFailedError") and err.__cause__ is not None:
            err = err.__cause__
        else:
            break
    return err


def remote_tracebacks(err: BaseException) -> list[str]:
    """The tracebacks Ray carried back as text from workers (each failed rank's, a task's)."""
    out, seen = [], set()
    while err is not None and id(err) not in seen:  # along the chain of causes, each once
        seen.add(id(err))
        for failure in (getattr(err, "worker_failures", None) or {}).values():
            out.append(getattr(failure, "_traceback_str", None) or str(failure))
        text = getattr(err, "traceback_str", None)
        if isinstance(text, str):
            out.append(text)
        err = err.__cause__ or err.__context__
    return out


def is_input_error(err: BaseException) -> bool:
    """Whether `err` (under its wrappers) is one that retrying cannot fix: bad input."""
    return any(c.__name__ in INPUT_ERROR_NAMES for c in type(root_cause(err)).__mro__)


def describe(err: BaseException, limit: int = 400) -> str:
    """`Type: message` of the root cause, as one line."""
    root = root_cause(err)
    text = one_line(str(root), limit) if str(root) else ""
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def part_of(err: BaseException) -> str | None:
    """The part (`parallel.run_parts`' name) an exception came from, if it came from one."""
    return getattr(err, PART_ATTR, None)
