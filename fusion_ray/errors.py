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
