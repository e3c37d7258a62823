"""Conveyor Python SDK: submit tasks and workflows, watch results, run workers."""

__version__ = "0.1.0"

from conveyor.canvas import RetryPolicy, Sig, chain, chord, group, si, sig
from conveyor.client import CallRetry, Client, State, Submitted, state_name, value_of
from conveyor.context import TaskContext, current_task
from conveyor.error_details import FieldViolation
from conveyor.errors import (
    AlreadyExists,
    ConveyorError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Reject,
    ResourceExhausted,
    ResultIgnored,
    Retry,
    RpcFailed,
    SoftTimeLimitExceeded,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TimeLimitExceeded,
    Unavailable,
    WorkerLost,
)
from conveyor.replacement import replace
from conveyor.sync import SyncClient, SyncSubmitted
from conveyor.worker import Worker

__all__ = [
    "AlreadyExists",
    "CallRetry",
    "Client",
    "ConveyorError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "PermissionDenied",
    "Reject",
    "ResourceExhausted",
    "ResultIgnored",
    "Retry",
    "RetryPolicy",
    "RpcFailed",
    "Sig",
    "SoftTimeLimitExceeded",
    "State",
    "Submitted",
    "SyncClient",
    "SyncSubmitted",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskNotFound",
    "TimeLimitExceeded",
    "Unavailable",
    "Worker",
    "WorkerLost",
    "chain",
    "chord",
    "current_task",
    "group",
    "replace",
    "si",
    "sig",
    "state_name",
    "value_of",
]
