"""Independent parts of a stage (collect per model, train per arm), run side by side from the driver.

Each part is a blocking call that drives Ray work (a Ray Data pipeline, a `TorchTrainer.fit`)
and then writes its output from the driver; `run_parts` runs each in its own driver thread,
at most `limit` at a time, so the cluster executes them together where it has room (and
Ray queues what does not fit). Threads, not Ray tasks: the parts' Ray work runs elsewhere
anyway, and what they do in the driver (gathering shards, copying checkpoints, writing
manifests) stays in the driver as before. Ray Train V2's `fit()` supports this: off the
main thread it only skips installing its SIGINT handler (Ctrl-C still ends the driver, and
with it the controllers it owns).

Failure: the first part to fail stops parts not yet started; running parts finish (their
outputs are complete, so a rerun skips them); then the first failure in part order is
raised as it was. With `limit=1` this is the old sequential loop, stop-at-first-error included.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Outcome:
    """What one part returned, or raised, and when it ran (wall-clock, `time.time()`)."""

    result: Any = None
    error: BaseException | None = None
    started_at: float | None = None
    finished_at: float | None = None


def run_parts(parts: dict[str, Callable[[], Any]], limit: int | None = None, *,
              thread_prefix: str = "part") -> dict[str, Outcome]:
    """Run each callable in its own driver thread, at most `limit` at once (None: all).

    Returns:
        name → `Outcome` for every part that ran, in the order of `parts`.

    Raises:
        the first failing part's exception (in part order), after the running parts end.
    """
    limit = len(parts) if limit is None else max(1, limit)
    todo = list(parts)
    done: queue.Queue[str] = queue.Queue()
    outcomes: dict[str, Outcome] = {}
    running = 0
    while todo or running:
        failed = any(o.error is not None for o in outcomes.values())
        while todo and running < limit and not failed:
            name = todo.pop(0)
            outcomes[name] = Outcome()
            threading.Thread(target=_run_one, args=(parts[name], outcomes[name], name, done),
                             name=f"{thread_prefix}:{name}", daemon=True).start()
            running += 1
        if failed:
            todo.clear()
        if running:
            _wait(done)
            running -= 1
    errors = [o.error for o in outcomes.values() if o.error is not None]
    if errors:
        raise errors[0]
    return outcomes


def _run_one(fn: Callable[[], Any], outcome: Outcome, name: str, done: queue.Queue) -> None:
    outcome.started_at = time.time()
    try:
        outcome.result = fn()
    except BaseException as err:  # handed to the driver's thread, raised there
        from fusion_ray.errors import PART_ATTR

        try:  # the outermost part names it (a stage's arm, source or model)
            setattr(err, PART_ATTR, name)
        except AttributeError:  # an exception type that takes no attributes
            pass
        outcome.error = err
    finally:
        outcome.finished_at = time.time()
        done.put(name)


def _wait(done: queue.Queue) -> str:
    """The next finished part; waits in short slices so Ctrl-C reaches the main thread."""
    while True:
        try:
            return done.get(timeout=0.5)
        except queue.Empty:
            continue
