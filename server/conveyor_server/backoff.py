"""Jittered exponential backoff for reaching an engine again, shared by the engine clients and
the worker streams' fetch loops."""

from __future__ import annotations

import random

# Reconnecting to an engine that went away: the first delay and the cap. The cap bounds how long after
# the engine's return the next attempt comes.
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 1.0


class Backoff:
    """Delays between attempts to reach an engine again: doubling from `first` up to `cap`, each drawn
    between half and all of that, so replicas that lost the engine together do not retry in step."""

    def __init__(self, first: float = BACKOFF_FIRST_SECONDS, cap: float = BACKOFF_MAX_SECONDS) -> None:
        self.first = first
        self.cap = cap
        self._ceiling = first

    def next(self) -> float:
        delay = random.uniform(self._ceiling / 2, self._ceiling)
        self._ceiling = min(self._ceiling * 2, self.cap)
        return delay

    def reset(self) -> None:
        """The engine answered: the next failure starts from `first` again."""
        self._ceiling = self.first
