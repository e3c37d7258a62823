"""The last hour of the overview's charts: succeeded and failed tasks per second (this replica's
outcome counters), queue depths and the age of each queue's oldest waiting task, sampled every
SAMPLE_SECONDS while the HTTP server runs. A sample costs one broker stats read per queue and
one task index read per queue with tasks waiting; nothing on the task path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from ..core.records import TaskStates

if TYPE_CHECKING:
    from ..app import Core

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 5.0
HISTORY_SECONDS = 3600.0
# Queues whose oldest task's age is looked up per sample (the deepest ones).
MAX_AGED_QUEUES = 20


@dataclass(frozen=True)
class Sample:
    at: float
    succeeded: float
    failed: float
    ready: dict[str, int]
    in_flight: dict[str, int]
    submitted: dict[str, float]
    oldest: dict[str, float]
    workers: int

    def json(self) -> dict[str, Any]:
        return {"at": self.at, "succeeded": round(self.succeeded, 3), "failed": round(self.failed, 3),
                "ready": self.ready, "in_flight": self.in_flight, "submitted": self.submitted,
                "oldest": {q: round(age, 3) for q, age in self.oldest.items()}, "workers": self.workers}


def counter_totals(counter: Counter, label: str) -> dict[str, float]:
    """A counter's values summed by one label."""
    found: dict[str, float] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                found[key] = found.get(key, 0.0) + sample.value
    return found


@dataclass
class Sampler:
    core: Core
    interval: float = SAMPLE_SECONDS
    history: deque[Sample] = field(default_factory=deque)
    listeners: list[Callable[[Sample], None]] = field(default_factory=list)
    _previous: tuple[float, dict[str, float], dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.history = deque(maxlen=max(1, int(HISTORY_SECONDS / self.interval)))

    def latest_submitted(self) -> dict[str, float]:
        """Submissions per second by queue, in the last sample ({} before the first)."""
        return self.history[-1].submitted if self.history else {}

    async def run(self) -> None:
        while True:
            try:
                self._add(await self.take())
            except Exception as exc:  # the engines may be away: the next sample will tell
                log.debug("dashboard sample failed: %s", exc)
            await asyncio.sleep(self.interval)

    def _add(self, sample: Sample) -> None:
        self.history.append(sample)
        for listener in self.listeners:
            listener(sample)

    async def take(self) -> Sample:
        core = self.core
        now = time.time()
        outcomes = counter_totals(core.metrics.outcomes, "state")
        submitted = counter_totals(core.metrics.submitted, "queue")
        queues = await core.admin.queues()
        previous, self._previous = self._previous, (now, outcomes, submitted)
        rates: dict[str, float] = {}
        succeeded = failed = 0.0
        if previous is not None:
            then, before, submitted_before = previous
            span = max(now - then, 1e-3)
            succeeded = (outcomes.get("success", 0) - before.get("success", 0)) / span
            failed = (outcomes.get("failure", 0) - before.get("failure", 0)) / span
            rates = {q: round((n - submitted_before.get(q, 0)) / span, 3) for q, n in submitted.items()}
        waiting = sorted((q for q in queues if q.ready), key=lambda q: -q.ready)[:MAX_AGED_QUEUES]
        return Sample(
            at=now, succeeded=succeeded, failed=failed,
            ready={q.name: q.ready for q in queues}, in_flight={q.name: q.in_flight for q in queues},
            submitted=rates, oldest=await self._oldest(q.name for q in waiting),
            workers=len(core.registry.sessions),
        )

    async def _oldest(self, queues: Iterable[str]) -> dict[str, float]:
        indexer = self.core.admin.indexer
        if not indexer.enabled:
            return {}
        ages: dict[str, float] = {}
        for queue in queues:
            age = await indexer.oldest_age(queue, frozenset({TaskStates.TASK_STATE_PENDING}))
            if age is not None:
                ages[queue] = age
        return ages
