"""Assertions shared by the chaos tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from conveyor import Client, state_name
from conveyor.v1 import result_pb2
from tests.support.processes import log_lines, settled

TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}


async def assert_each_succeeded_once(client: Client, task_ids: Sequence[str], log_file: Path,
                                     wait: float = 90.0) -> Counter[int]:
    """Every task ended SUCCESS with its own index as the result, and its record holds exactly
    one terminal transition: however often it ran, its outcome was recorded once. The records
    are read again once the runs in `log_file` have settled (no new run for a while), so a
    duplicate run that ends late is checked too. Returns the settled run counts (`run_counts`)."""
    for task_id in task_ids:
        await client.get_result(task_id, wait=wait)
    counts = await settled(lambda: run_counts(log_file), what="runs per task")
    problems: list[str] = []
    for index, task_id in enumerate(task_ids):
        result = await client.get_result(task_id)
        terminal = [state_name(t.state) for t in result.history if t.state in TERMINAL]
        if state_name(result.state) != "SUCCESS" or terminal != ["SUCCESS"]:
            problems.append(f"{task_id}: {state_name(result.state)}, terminal transitions {terminal}")
        elif result.result.int_value != index:
            problems.append(f"{task_id}: result {result.result} != {index}")
    assert not problems, f"{len(problems)} of {len(task_ids)} tasks: {problems[:10]}"
    return counts


def runs_by_task(log_file: Path) -> dict[str, list[str]]:
    """task id -> pids of the worker processes that started it, from `chaos` log lines."""
    runs: dict[str, list[str]] = {}
    for line in log_lines(log_file, "chaos "):
        _, task_id, _, pid = line.split(" ")
        runs.setdefault(task_id, []).append(pid.removeprefix("pid="))
    return runs


def rerun_after_kill(log_file: Path, killed_pids: set[str]) -> list[str]:
    """Tasks that a killed worker had started and another worker ran again."""
    return [
        task_id for task_id, pids in runs_by_task(log_file).items()
        if set(pids) & killed_pids and set(pids) - killed_pids
    ]


def started_count(log_file: Path) -> int:
    return len(log_lines(log_file, "chaos "))


def run_counts(log_file: Path) -> Counter[int]:
    """How many tasks ran once, twice, ..."""
    return Counter(len(pids) for pids in runs_by_task(log_file).values())
