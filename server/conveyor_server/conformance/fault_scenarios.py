"""Scenarios of runs that something interrupts: a cancel, a time limit, leases longer than the
task, a cut link, a lease taken away, a drain."""

from __future__ import annotations

import asyncio
import signal
import time

from conveyor.client import state_name, value_of
from conveyor.v1 import result_pb2, worker_service_pb2

from .kit import Kit, ScenarioFailed, call_text, shown
from .kit_worker import KitWorker
from .processes import LEASE_SECONDS, STREAM_GRACE_SECONDS

LONG_SLEEP = 30.0
TIME_LIMIT = 1.0
# The server fails an attempt this long past its time limit when the worker did not stop it.
SERVER_BACKSTOP_SECONDS = 5.0
REPORT_SECONDS = 5.0
RECONNECT_SECONDS = 15.0
DRAIN_SECONDS = 15.0
# The stale-lease scenario's own result, which must win over the worker's late one.
KIT_RESULT = "the conformance kit's result"


async def _sleep_started(kit: Kit, seconds: float) -> tuple[str, str]:
    """Submit conformance.sleep(seconds) and wait until the worker started it."""
    call = call_text("conformance.sleep", (seconds,))
    task_id = await kit.submit("conformance.sleep", seconds)
    await kit.started(task_id, call)
    return task_id, call


async def _succeeded_once(kit: Kit, task_id: str, call: str, seconds: float, why: str, within: float = 15.0) -> None:
    """The sleep succeeded with its argument, on its first attempt and first delivery; `why`
    explains a second delivery."""
    result = await kit.finished(task_id, call, within)
    got = value_of(result)
    if result.state != result_pb2.TASK_STATE_SUCCESS or got != seconds:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} with {shown(got)} "
                             f"({result.error.type}: {result.error.message}), expected SUCCESS with {seconds:g}")
    deliveries = (await kit.inspect(task_id)).deliveries
    if result.attempts != 1 or deliveries != 1:
        raise ScenarioFailed(f"{call} took {result.attempts} attempt(s) and {deliveries} deliveries, expected 1 and 1: "
                             f"{why}")


async def _still_serving(kit: Kit, after: str) -> None:
    marker = f"still serving after {after}"
    await kit.expect_value("conformance.echo", marker, marker)


async def cancel(kit: Kit) -> None:
    task_id, call = await _sleep_started(kit, LONG_SLEEP)
    await kit.client.cancel(task_id)
    result = await kit.finished(task_id, call, REPORT_SECONDS)
    if result.state != result_pb2.TASK_STATE_CANCELLED:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} after a cancel, expected CANCELLED")

    async def released() -> bool:
        return all(info.in_flight == 0 for info in await kit.workers())

    await kit.until(released, REPORT_SECONDS, f"the worker still holds {call} {REPORT_SECONDS:g} s after its cancel: "
                    "it did not stop the task and report it (OUTCOME_CANCELLED)")
    await _still_serving(kit, "a cancel")


async def time_limit(kit: Kit) -> None:
    began = time.monotonic()
    call = f"{call_text('conformance.sleep', (LONG_SLEEP,))} with time_limit={TIME_LIMIT:g}"
    task_id = await kit.submit("conformance.sleep", LONG_SLEEP, time_limit=TIME_LIMIT)
    result = await kit.finished(task_id, call, TIME_LIMIT + SERVER_BACKSTOP_SECONDS + 10)
    took = time.monotonic() - began
    if result.state != result_pb2.TASK_STATE_FAILURE or result.error.type != "TimeLimitExceeded":
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} ({result.error.type}: {result.error.message}), "
                             "expected FAILURE with TimeLimitExceeded")
    by_server = not any(change.worker_id for change in result.history if change.state == result_pb2.TASK_STATE_FAILURE)
    if by_server or took >= TIME_LIMIT + SERVER_BACKSTOP_SECONDS:
        raise ScenarioFailed(f"{call} was stopped by the server's backstop after {took:.1f} s: the worker did not "
                             "stop it at its time limit")


async def heartbeats(kit: Kit) -> None:
    seconds = LEASE_SECONDS * 1.5 + 0.25  # past the lease: only heartbeats keep it
    task_id, call = await _sleep_started(kit, seconds)
    await _succeeded_once(kit, task_id, call, seconds, f"its {LEASE_SECONDS:g} s lease lapsed; does the worker "
                          "send a Heartbeat every Welcome.heartbeat_interval?", within=seconds + 15)


async def reconnect_resend(kit: Kit) -> None:
    seconds = 0.5
    task_id, call = await _sleep_started(kit, seconds)
    kit.proxy.silence()  # the task ends meanwhile; its result is lost in the silence
    await asyncio.sleep(seconds + 1.0)
    kit.proxy.cut()  # the worker sees the stream break, and may reconnect at once
    await _succeeded_once(kit, task_id, call, seconds, "the worker did not send its result again after reconnecting "
                          f"(within the server's {STREAM_GRACE_SECONDS:g} s grace), so the task ran again")
    await kit.connected(RECONNECT_SECONDS, f"the worker did not reconnect within {RECONNECT_SECONDS:g} s")


async def reconnect_held(kit: Kit) -> None:
    seconds = STREAM_GRACE_SECONDS + LEASE_SECONDS + 1.5  # runs on past the old stream's grace and a lease
    task_id, call = await _sleep_started(kit, seconds)
    kit.proxy.cut()  # the stream breaks while the task runs; the worker may reconnect at once
    await kit.connected(RECONNECT_SECONDS, f"the worker did not reconnect within {RECONNECT_SECONDS:g} s")
    await _succeeded_once(kit, task_id, call, seconds, "the worker's new Hello did not name the running task in "
                          "`held`, so the server handed it out again when the old stream's "
                          f"{STREAM_GRACE_SECONDS:g} s grace ended", within=seconds + 15)


async def stale_lease(kit: Kit) -> None:
    seconds = 1.5
    task_id, call = await _sleep_started(kit, seconds)
    kit.proxy.cut(refuse=True)  # past the stream grace the task goes back to its queue
    thief = KitWorker(kit.server.address, kit.tokens.worker, kit.queue, ["conformance.sleep"])
    await thief.start()
    try:
        assignment = await thief.take(STREAM_GRACE_SECONDS + 10)
        if assignment is None or assignment.task.id != task_id:
            raise ScenarioFailed(f"the server did not hand {call} to another worker after the worker's stream broke")
        kit.proxy.restore()
        await kit.connected(RECONNECT_SECONDS, f"the worker did not reconnect within {RECONNECT_SECONDS:g} s "
                            "of the link coming back")
        # No sign shows when the worker has resent its late result: give it a moment.
        await asyncio.sleep(1.0)
        status = await thief.finish(assignment, KIT_RESULT)
    finally:
        await thief.close()
    result = await kit.client.get_result(task_id)
    got = value_of(result) if result.state == result_pb2.TASK_STATE_SUCCESS else None
    if got != KIT_RESULT or status != worker_service_pb2.ACK_STATUS_ACCEPTED:
        raise ScenarioFailed(f"{call} ended {state_name(result.state)} with {shown(got)}: the worker's result under "
                             "a lease the server had taken back was recorded (expected it refused as STALE_LEASE)")
    await _still_serving(kit, "a stale lease")


async def drain(kit: Kit) -> None:
    seconds = 1.5
    task_id, call = await _sleep_started(kit, seconds)
    kit.worker.signal(signal.SIGTERM)
    result = await kit.finished(task_id, call, DRAIN_SECONDS)
    got = value_of(result)
    if result.state != result_pb2.TASK_STATE_SUCCESS or got != seconds:
        raise ScenarioFailed(f"after SIGTERM, {call} ended {state_name(result.state)} with {shown(got)} "
                             f"({result.error.type}: {result.error.message}), expected the worker to finish it")

    async def exited() -> bool:
        return kit.worker.exit_code() is not None

    await kit.until(exited, DRAIN_SECONDS, f"the worker did not exit within {DRAIN_SECONDS:g} s of SIGTERM; is a "
                    "task it was told to stop (cancelled, or past its time limit) still running?")
    if kit.worker.exit_code() != 0:
        raise ScenarioFailed(f"the worker exited with status {kit.worker.exit_code()} after SIGTERM, expected 0")
