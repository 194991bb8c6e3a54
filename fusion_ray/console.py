"""What a run prints at the terminal, and the log file that keeps everything.

A run's terminal shows its own lines: each stage's `[stage] …` lines, whether the driver or a
worker (`(RayTrainWorker pid=…) [train] … step …`) wrote them, and the one line that ends a
failed run. Everything else Ray forwards from its workers and actors (their warnings, their
tracebacks, Ray Train's controller log, vLLM's engine chatter) goes to the run's log file only,
with every terminal line beside it, so the file reads as the whole run. `fusion-ray --debug`
turns the routing off: everything reaches the terminal as Ray prints it.
"""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

# A line Ray forwards from a worker (`(ActorName pid=123, ip=…) message`) or from its own
# daemons (`(raylet) …`), with colour codes unless RAY_COLOR_PREFIX=0.
_WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:.*?pid=\d+(?:, ip=[^)]*)?|raylet|autoscaler|gcs_server)\)"
                          r"(?:\x1b\[[0-9;]*m)* ?(?P<msg>.*)$", re.S)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# One of the project's own lines: `[stage] …` or `[stage:part] …` (a timestamp `[2026-…` is not one).
_OUR_LINE = re.compile(r"^\[[a-z][a-z0-9_:.-]*\]")


def shown(line: str) -> bool:
    """Whether a line belongs on the terminal: the driver's own, or a worker's `[stage]` line."""
    m = _WORKER_LINE.match(line)
    return m is None or bool(_OUR_LINE.match(m.group("msg")))


class Router(io.TextIOBase):
    """A text stream that writes every line to `log` and the lines `shown` keeps to `terminal`.

    Ray colours the prefix of a worker's line whether or not anyone reads it on a terminal; the
    colour codes reach the terminal only where it is one, never the log file."""

    def __init__(self, terminal, log):
        self.terminal, self.log, self._pending = terminal, log, ""
        try:
            self._colour = bool(terminal.isatty())
        except (AttributeError, ValueError):
            self._colour = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self):
        return getattr(self.terminal, "encoding", "utf-8")

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        if "\r" in self._pending:  # a progress bar redrawn in place: the terminal's only
            self.terminal.write(self._pending)
            self._pending = ""
        for line in lines:
            plain = _COLOUR.sub("", line)
            self.log.write(plain + "\n")
            if shown(line):
                self.terminal.write((line if self._colour else plain) + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


def log_path(workdir: str, command: str) -> Path:
    """`<workdir>/logs/<command>-<UTC time>.log` for a local workdir; for an object-store workdir
    the same name below this node's cache (`$FUSION_RAY_CACHE/logs/`)."""
    from fusion_ray import locations

    name = f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    if locations.kind(workdir) == "uri":
        return locations.cache_root() / "logs" / name
    return Path(workdir.removeprefix("file://")).expanduser() / "logs" / name


def route(path: Path) -> Path:
    """Route this process's stdout and stderr (`Router`) into the log file at `path`, until the
    process ends: Ray prints what its workers wrote last (a failed rank's traceback) after the
    driver's own work has ended, at its shutdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the process's life
    sys.stdout, sys.stderr = Router(sys.stdout, log), Router(sys.stderr, log)
    return path
