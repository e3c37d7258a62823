"""Conveyor Python SDK: submit tasks and workflows, watch results, run workers."""

__version__ = "0.1.0"

from conveyor.canvas import RetryPolicy, Sig, chain, chord, group, si, sig
from conveyor.client import CallRetry, Client, Submitted, state_name, value_of
from conveyor.context import TaskContext, current_task
from conveyor.errors import ConveyorError, Retry, TaskCancelled, TaskFailed, TimeLimitExceeded
from conveyor.sync import SyncClient
from conveyor.worker import Worker

__all__ = [
    "CallRetry",
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
