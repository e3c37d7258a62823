"""Chaos: SQS delivers messages twice (as standard queues may), and the server copes.

moto runs in its own process with receives unserialised and half of the messages sent twice
(patch_moto's `duplicates`): each copy comes at once, a second later (while its task runs) or
three seconds later (after it ended). Every task must still end SUCCESS with one recorded
outcome; a copy that comes while the task runs is dropped, and one that comes after it ended
never runs it again. Only a copy that arrives with the first may be dispatched beside it
(at-least-once: both are claimed before either is recorded), so every dispatch of a task (its
RECEIVED transitions, stamped when the server claimed the message) falls within a moment.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conveyor import Client, sig
from conveyor.v1 import result_pb2
from tests.chaos.checks import assert_each_succeeded_once
from tests.fixtures.broker_services import session_prefix, start_moto_process
from tests.support.processes import Proc, Server, WorkerProc, log_lines, wait_for_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TASKS = 60
TASK_SECONDS = 2.0
# A slot for every task and copy, one assignment per slot (prefetch 1): a dispatched run starts
# at once, never after its task ended while it waited in a worker for a slot.
WORKERS, CONCURRENCY = 3, 40
DUPLICATES = 0.5
# A second dispatch this long after the first can only come from a copy delivered while the task
# ran or after it ended: one the server must have dropped (copies come 1 or 3 s late, or at once).
SAME_MOMENT_SECONDS = 0.5
# Leases far longer than a task, so that no lease lapses on a busy machine: a lapsed lease is a
# real redelivery, which may run the task again; this test is about copies.
LONG_LEASES = {"CONVEYOR_LEASE_SECONDS": "15", "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "1"}


@pytest.fixture(params=[False, True], ids=["copies", "copies-and-racy-receives"])
def duplicating_sqs(request: pytest.FixtureRequest, tmp_path: Path, procs: list[Proc]) -> str:
    """A broker URL on a moto of this test's own that delivers half of the messages twice; with
    racy receives, also the same message to two receivers now and then."""
    moto, endpoint = start_moto_process(tmp_path, serialise_receives=not request.param, duplicates=DUPLICATES)
    procs.append(moto)
    return f"sqs://?endpoint={endpoint}&region=us-east-1&prefix={session_prefix('dd')}"


async def test_duplicate_deliveries_run_no_task_again(
    tmp_path: Path, procs: list[Proc], log_file: Path, duplicating_sqs: str
) -> None:
    server = Server(tmp_path, duplicating_sqs, f"sqlite:///{tmp_path / 'results.db'}", env=LONG_LEASES)
    procs.append(server)
    env = {"CONVEYOR_TEST_LOG": str(log_file), "CONVEYOR_TEST_CONCURRENCY": str(CONCURRENCY)}
    queue = f"dup-{uuid.uuid4().hex[:8]}"
    procs.extend(
        WorkerProc(tmp_path, server.address, module="tests.chaos.dup_tasks", queues=[queue],
                   concurrency=CONCURRENCY, prefetch=1, env=env, name=f"worker-{i}")
        for i in range(WORKERS)
    )
    wait_for_workers(server.address, WORKERS)
    async with Client(server.address) as client:
        submitted = await client.submit_batch(sig("hold", i, TASK_SECONDS).set(queue=queue) for i in range(TASKS))
        task_ids = [s.task_id for s in submitted]
        # Waits until the runs have settled: copies sent 3 s late have come and gone.
        counts = await assert_each_succeeded_once(client, task_ids, log_file)
        results = {task_id: await client.get_result(task_id) for task_id in task_ids}
    ended = {task_id: _ended_at(result) for task_id, result in results.items()}

    starts: dict[str, list[float]] = {}
    for line in log_lines(log_file, "chaos "):
        _, task_id, started, _ = line.split(" ")
        starts.setdefault(task_id, []).append(float(started))
    assert set(starts) == set(task_ids), "every task ran"
    after_end = [t for t, runs in starts.items() if max(runs) > ended[t]]
    assert not after_end, f"tasks run again after they ended: {_explain(after_end, starts, results)}"
    dispatched = {t: _at(r, result_pb2.TASK_STATE_RECEIVED) for t, r in results.items()}
    late = [t for t, times in dispatched.items() if max(times) - min(times) > SAME_MOMENT_SECONDS]
    assert not late, f"a copy delivered while the task ran was dispatched: {_explain(late, starts, results)}"
    print(f"runs per task: {dict(sorted(counts.items()))}")


def _explain(task_ids: list[str], starts: dict[str, list[float]], results: dict[str, result_pb2.TaskResult]) -> str:
    """Run starts and the recorded transitions (state, time, attempt, worker) of a few tasks."""
    return "; ".join(
        f"{task_id}: runs at {sorted(starts[task_id])}, transitions "
        + str([(result_pb2.TaskState.Name(t.state), round(t.at.seconds + t.at.nanos / 1e9, 3), t.attempt, t.worker_id)
               for t in results[task_id].history])
        for task_id in task_ids[:3]
    )


def _at(result: result_pb2.TaskResult, state: result_pb2.TaskState.ValueType) -> list[float]:
    """When the task's record took `state` (each time), unix time."""
    return [t.at.seconds + t.at.nanos / 1e9 for t in result.history if t.state == state]


def _ended_at(result: result_pb2.TaskResult) -> float:
    (end,) = _at(result, result_pb2.TASK_STATE_SUCCESS)
    return end
