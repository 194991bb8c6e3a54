"""Streaming text out of a growing decode: safe deltas, cut at the first stop sequence.

A streamed reply must concatenate to exactly the non-streamed one, so nothing is sent
that a later token could still turn into a stop sequence (a suffix that is a prefix of a
stop), nor half a UTF-8 character (the decoder's U+FFFD). Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StopText:
    """Feed the whole text decoded so far; get back what may be sent now.

    Args:
        stops: stop sequences; the reply ends before the first one and excludes it.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.sent = 0
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """The new visible text; `final` (end of generation) releases what was held back."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            visible = text[:cut]
        elif final:
            visible = text
        else:
            visible = text[: len(text) - stop_prefix_len(text, self.stops)]
            if visible.endswith(REPLACEMENT):  # half a character: wait for the rest
                visible = visible.rstrip(REPLACEMENT)
        delta = visible[self.sent :]
        self.sent = max(self.sent, len(visible))
        return delta
