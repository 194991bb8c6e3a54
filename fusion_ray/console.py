"""What a run prints at the terminal, and the log file that keeps everything.

A run's terminal shows its own lines: each stage's `[stage] …` lines, whether the driver or a
worker (`(RayTrainWorker pid=…) [train] … step …`) wrote them, and the one line that ends a
failed run. Everything else Ray forwards from its workers and actors (their warnings, their
tracebacks, Ray Train's controller log, vLLM's engine chatter) goes to the run's log file only,
with every terminal line beside it, so the file reads as the whole run. Lines known to be
harmless on a successful run (`HARMLESS`: a Ray core warning printed at ERROR level, DeepSpeed's
CPU notice, ...) go to the log file only, also when the driver's C++ core writes them straight
to file descriptor 2 (`route` reads that descriptor through a pipe). `fusion-ray --debug` turns
the routing off: everything reaches the terminal as Ray prints it.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import sys
import threading
import time
from pathlib import Path

# A line Ray forwards from a worker (`(ActorName pid=123, ip=…) message`) or from its own
# daemons (`(raylet) …`), with colour codes unless RAY_COLOR_PREFIX=0.
_WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:.*?pid=\w+(?:, ip=[^)]*)?|raylet|autoscaler|gcs_server)\)"
                          r"(?:\x1b\[[0-9;]*m)* ?(?P<msg>.*)$", re.S)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# One of the project's own lines: `[stage] …` or `[stage:part] …` (a timestamp `[2026-…` is not one).
_OUR_LINE = re.compile(r"^\[[a-z][a-z0-9_:.-]*\]")


# Lines a successful run prints that are not ours and say nothing wrong with it: the log file keeps
# them, the terminal does not. Each names its source and why it is harmless here.
HARMLESS = tuple(re.compile(p) for p in (
    # Ray core, at ERROR level from the driver's C++ core (ray-project/ray#53727): Ray Data keeps the
    # actor pool's constructor arguments referenced for as long as the pool lives
    r"has constructor arguments in the object store and max_restarts > 0",
    r"Setting accelerator to CPU\. If you have GPU",  # DeepSpeed imported on a node without a GPU
    r"Progress bars disabled\. To enable",  # Ray Data's bars are off where no terminal reads them
    # the GCS killing an actor of a finished pool that has already exited
    r"Failed to kill actor [0-9a-f]+, return status: Invalid: KillActor RPC failed",
    r"`loss_type=None` was set in the config but it is unrecognized",  # transformers, on such checkpoints
))


def shown(line: str) -> bool:
    """Whether a line belongs on the terminal: the driver's own, or a worker's `[stage]` line;
    never a line of `HARMLESS`."""
    if any(p.search(line) for p in HARMLESS):
        return False
    m = _WORKER_LINE.match(line)
    return m is None or bool(_OUR_LINE.match(m.group("msg")))


class Router(io.TextIOBase):
    """A text stream that writes every line to `log` and the lines `shown` keeps to `terminal`.

    Ray colours the prefix of a worker's line whether or not anyone reads it on a terminal; the
    colour codes reach the terminal only where it is one, never the log file."""

    def __init__(self, terminal, log):
        self.terminal, self.log, self._pending = terminal, log, ""
        self._lock = threading.Lock()  # Python's writes and the descriptor reader's (`route`)
        self._hid_bar = False  # a bar not shown was cut at its `\r`: the newline that ends it is its own
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
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                if self._hid_bar and not line.strip("\r"):
                    self._hid_bar = False  # the end of a bar that was not shown
                    continue
                self._hid_bar = False
                plain = _COLOUR.sub("", line)
                self.log.write(plain + "\n")
                if shown(line.lstrip("\r")):
                    self.terminal.write((line if self._colour else plain) + "\n")
            if "\r" in self._pending:  # a progress bar redrawn in place: the terminal's, when it is ours
                if shown(self._pending.lstrip("\r")):
                    self.terminal.write(self._pending)
                else:
                    self._hid_bar = True
                self._pending = ""
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
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = sys.stderr
    try:  # what C/C++ code writes to descriptor 2 (Ray's core) reaches the router through a pipe
        terminal = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace", buffering=1)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except (AttributeError, OSError, ValueError):  # no descriptor to redirect (an embedded stream)
        read_end = None
    sys.stdout, sys.stderr = Router(sys.stdout, log), Router(terminal, log)
    if read_end is not None:
        reader = threading.Thread(target=_relay, args=(read_end, sys.stderr), name="fd2-relay", daemon=True)
        reader.start()
        atexit.register(_restore_fd2, terminal, reader)
    return path


def _relay(read_end: int, router: Router) -> None:
    """Each line written to descriptor 2 into `router`, until the pipe closes."""
    with os.fdopen(read_end, "r", encoding="utf-8", errors="replace", buffering=1) as pipe:
        for line in pipe:
            router.write(line)
            router.flush()


def _restore_fd2(terminal, reader: threading.Thread) -> None:
    """At exit: descriptor 2 is the terminal again, and what the pipe still holds is relayed."""
    os.dup2(terminal.fileno(), 2)  # the pipe's last write end closes: the reader sees its end
    reader.join(timeout=2)
