"""Conveyor Python SDK: submit tasks and workflows, watch results, run workers."""

__version__ = "0.1.0"

from conveyor.canvas import RetryPolicy, Sig, chain, chord, group, si, sig  # noqa: E402
from conveyor.client import Client, Submitted, state_name, value_of  # noqa: E402
from conveyor.context import TaskContext, current_task  # noqa: E402
from conveyor.errors import ConveyorError, Retry, TaskCancelled, TaskFailed, TimeLimitExceeded  # noqa: E402
from conveyor.sync import SyncClient  # noqa: E402
from conveyor.worker import Worker  # noqa: E402

__all__ = [
    "Client",
    "ConveyorError",
    "Retry",
    "RetryPolicy",
    "Sig",
    "Submitted",
    "SyncClient",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TimeLimitExceeded",
    "Worker",
    "chain",
    "chord",
    "current_task",
    "group",
    "si",
    "sig",
    "state_name",
    "value_of",
]
