"""What the worker logs (logger "conveyor.worker"): a start banner, then one line per task as it
is received and as it ends, with the traceback of a failure. Plain lines or JSON, as the
logging setup says (`conveyor --log-json worker ...`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from conveyor.context import TaskContext
from conveyor.execution import Ending
from conveyor.v1 import worker_service_pb2

log = logging.getLogger("conveyor.worker")


def banner(version: str, address: str, queues: Iterable[str], pool: str, concurrency: int, window: str,
           tasks: Iterable[str]) -> None:
    """`window`: how many tasks the worker holds, e.g. "prefetch 4 (window 32)"."""
    log.info("conveyor worker %s starting: server %s, queues [%s], pool %s, concurrency %d, %s, tasks [%s]",
             version, address, ", ".join(queues), pool, concurrency, window, ", ".join(sorted(tasks)))


def _took(seconds: float) -> str:
    milliseconds = seconds * 1000
    if milliseconds < 10:
        return f"{milliseconds:.1f} ms"
    if milliseconds < 10_000:
        return f"{milliseconds:.0f} ms"
    return f"{seconds:.1f} s"


def received(context: TaskContext) -> None:
    if log.isEnabledFor(logging.INFO):
        again = f" (attempt {context.attempt})" if context.attempt > 1 else ""
        log.info("task %s[%s] received%s", context.name, context.task_id, again)


def ended(context: TaskContext, ending: Ending) -> None:
    name, task_id, took = context.name, context.task_id, _took(ending.runtime)
    if ending.outcome == worker_service_pb2.OUTCOME_SUCCESS:
        if log.isEnabledFor(logging.INFO):
            log.info("task %s[%s] succeeded in %s", name, task_id, took)
    elif ending.outcome == worker_service_pb2.OUTCOME_RETRY:
        log.info("task %s[%s] retried in %g s: %s", name, task_id, ending.retry_delay,
                 ending.error.message if ending.error else "")
    elif ending.outcome == worker_service_pb2.OUTCOME_CANCELLED:
        log.info("task %s[%s] cancelled after %s", name, task_id, took)
    elif ending.outcome in (worker_service_pb2.OUTCOME_REJECTED, worker_service_pb2.OUTCOME_REQUEUED):
        # The task refused itself on purpose: no traceback.
        action = "requeued itself" if ending.outcome == worker_service_pb2.OUTCOME_REQUEUED else "rejected itself"
        log.info("task %s[%s] %s after %s: %s", name, task_id, action, took,
                 ending.error.message if ending.error else "")
    else:
        error = ending.error
        kind, message, trace = (error.type, error.message, error.traceback.rstrip()) if error else ("", "", "")
        log.error("task %s[%s] failed in %s: %s: %s%s", name, task_id, took, kind, message,
                  f"\n{trace}" if trace else "")
