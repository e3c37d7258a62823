"""Scenarios of ordinary runs: registration, values round trips, failures, retries, progress."""

from __future__ import annotations

import os

from conveyor import RetryPolicy
from conveyor.client import state_name, value_of
from conveyor.v1 import admin_service_pb2, result_pb2
from conveyor.values import from_value

from .kit import Kit, ScenarioFailed, call_text, shown

# The task set every worker under test implements (docs/conformance.md).
TASK_NAMES = (
    "conformance.echo", "conformance.bytes", "conformance.fail", "conformance.retry", "conformance.sleep",
    "conformance.progress",
)
PLAIN_VALUES: tuple[object, ...] = (
    0, -7, 9_007_199_254_740_993, 2.5, -0.125, True, False, None, "plain text", "", [], {},
    [1, "two", [3.5, None]], {"a": 1, "b": {"c": [True, None], "d": "e"}},
)
UNICODE_VALUES: tuple[object, ...] = (
    "héllo wörld", "日本語のテキスト", "emoji 🚀🎉 and a ZWJ sequence 👩‍💻", "nul\u0000inside", "\u202eright to left",
    {"ключ": "значение", "🔑": ["ü", "中文", "\U0001f600"]},
)
LARGE_STRING_CHARS = 1_000_000
LARGE_BYTES = 256 * 1024
RETRY_TIMES = 2
PROGRESS_STEPS = 3


async def hello(kit: Kit) -> None:
    """The worker connects with its token, serves the queue and registers every task name."""
    await kit.connected(kit.startup_timeout, f"the worker did not connect on queue {kit.queue} within "
                        f"{kit.startup_timeout:g} s")
    response = await kit.admin.ListRegisteredTasks(admin_service_pb2.ListRegisteredTasksRequest(),
                                                   metadata=kit.metadata)
    served = {task.name for task in response.tasks if kit.queue in task.queues and task.worker_ids}
    missing = [name for name in TASK_NAMES if name not in served]
    if missing:
        raise ScenarioFailed(f"the worker did not register {', '.join(missing)} on queue {kit.queue}")


async def results(kit: Kit) -> None:
    for value in PLAIN_VALUES:
        await kit.expect_value("conformance.echo", value, value)


async def unicode(kit: Kit) -> None:
    for value in UNICODE_VALUES:
        await kit.expect_value("conformance.echo", value, value)


async def large_values(kit: Kit) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(LARGE_STRING_CHARS))
    await kit.expect_value("conformance.echo", text, text)
    data = os.urandom(LARGE_BYTES)
    await kit.expect_value("conformance.bytes", data, data[::-1])


async def bytes_reversed(kit: Kit) -> None:
    data = bytes(range(256))
    await kit.expect_value("conformance.bytes", data, data[::-1])
    await kit.expect_value("conformance.bytes", b"", b"")


async def errors(kit: Kit) -> None:
    message = "conformance failure: ünïcødé ✓"
    call = call_text("conformance.fail", (message,))
    result = await kit.finished(await kit.submit("conformance.fail", message), call)
    if result.state != result_pb2.TASK_STATE_FAILURE:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)}, expected FAILURE")
    if (result.error.type, result.error.message) != ("ConformanceError", message):
        raise ScenarioFailed(f"{call} failed with {result.error.type}: {shown(result.error.message)}, "
                             f"expected ConformanceError: {shown(message)}")
    if result.attempts != 1:
        raise ScenarioFailed(f"{call} ran {result.attempts} attempts, expected 1 (a failure is not a retry)")


async def retries(kit: Kit) -> None:
    call = call_text("conformance.retry", (RETRY_TIMES,))
    policy = RetryPolicy(max_attempts=RETRY_TIMES + 2, backoff="fixed", initial=0.1)
    result = await kit.finished(await kit.submit("conformance.retry", RETRY_TIMES, retry=policy), call)
    if result.state != result_pb2.TASK_STATE_SUCCESS:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} ({result.error.type}: "
                             f"{result.error.message}) after {result.attempts} attempts, expected SUCCESS")
    retried = sum(1 for change in result.history if change.state == result_pb2.TASK_STATE_RETRY)
    got = value_of(result)
    if (got, result.attempts, retried) != (RETRY_TIMES + 1, RETRY_TIMES + 1, RETRY_TIMES):
        raise ScenarioFailed(f"{call} returned {shown(got)} after {result.attempts} attempts ({retried} RETRY), "
                             f"expected {RETRY_TIMES + 1} after {RETRY_TIMES + 1} attempts ({RETRY_TIMES} RETRY)")


async def progress(kit: Kit) -> None:
    call = call_text("conformance.progress", (PROGRESS_STEPS,))
    result = await kit.finished(await kit.submit("conformance.progress", PROGRESS_STEPS), call)
    got, reported = value_of(result), from_value(result.progress)
    if result.state != result_pb2.TASK_STATE_SUCCESS or got != PROGRESS_STEPS:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} with {shown(got)}, "
                             f"expected SUCCESS with {PROGRESS_STEPS}")
    if reported != PROGRESS_STEPS:
        raise ScenarioFailed(f"{call}: the latest progress recorded is {shown(reported)}, expected {PROGRESS_STEPS}")
