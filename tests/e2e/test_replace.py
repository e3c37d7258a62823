"""Task replacement (`conveyor.replace`, Celery's `self.replace`) end to end (a server and a
worker process), on SQLite and on Redis (broker and backend, with a key prefix of their own).

The Celery tests are those of celery/t/integration/test_canvas.py that replace a task (each
names its own); their tasks are in tests/e2e/replace_tasks.py. Celery's link callbacks write to
Redis (redis_echo, redis_count); here `note` appends to the cluster's log file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import Client, TaskFailed, chain, chord, group, si, sig
from conveyor.canvas import Canvas
from tests.e2e.test_reject import client
from tests.support.engine_cluster import Cluster, engine_cluster
from tests.support.processes import eventually, log_lines, settled

__all__ = ["client"]  # the fixture (a client of this module's cluster) used by the tests below
pytestmark = pytest.mark.timeout(240)

WAIT = 60.0
ENGINES = ["sqlite", "redis"]


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server whose broker and backend are both `param`, and one worker of replace_tasks."""
    with engine_cluster(request, tmp_path_factory, module="tests.e2e.replace_tasks", concurrency=4) as started:
        yield started


def label() -> str:
    return uuid.uuid4().hex[:10]


def identity(*value: Any) -> Canvas:
    """Celery's identity.s(...): mutable, so in a chain it gets the previous result."""
    return sig("identity", *value)


async def run(client: Client, canvas: Canvas) -> Any:
    return await client.result(await client.submit(canvas), wait=WAIT)


async def fails(client: Client, canvas: Canvas) -> TaskFailed:
    with pytest.raises(TaskFailed) as failed:
        await run(client, canvas)
    return failed.value


async def notes(cluster: Cluster, text: str, expected: int) -> None:
    """`expected` runs of note(text), and no more (Celery's await_redis_echo / await_redis_count)."""
    await eventually(lambda: len(log_lines(cluster.log_file, f"note {text}")) >= expected, WAIT, f"note {text}")
    assert len(await settled(lambda: log_lines(cluster.log_file, f"note {text}"))) == expected


# -- Conveyor's own cases ------------------------------------------------------------------------


async def test_the_caller_of_a_replaced_task_gets_its_replacements_value(client: Client) -> None:
    assert await (await client.submit(sig("add_replaced", 2, 3))).result(timeout=WAIT) == 5
    assert await (await client.submit(sig("replace_with_group", 3))).result(timeout=WAIT) == [100, 101, 102]


async def test_a_replaced_chord_callback_gives_the_chord_its_replacements_value(client: Client) -> None:
    assert await run(client, chord([sig("add", 1, 1), sig("add", 2, 2)], sig("replace_with_tsum"))) == 6
    assert await run(client, chord([sig("add_replaced", 1, 2), sig("add", 4, 5)], sig("tsum")) | sig("add", 1)) == 13


async def test_a_failed_replacement_fails_the_task_and_runs_its_error_callback(
    client: Client, cluster: Cluster
) -> None:
    name = label()
    submitted = await client.submit(sig("fail_replaced").link_error(sig("note_error", name)))
    with pytest.raises(TaskFailed) as failed:
        await submitted.result(timeout=WAIT)
    assert failed.value.error_type == "ExpectedException", "the replacement's error is the task's"
    await eventually(lambda: log_lines(cluster.log_file, f"error {name} "), WAIT, "the error callback")
    assert log_lines(cluster.log_file, f"error {name} ") == [f"error {name} {submitted.task_id} ExpectedException"]


async def test_a_replacement_that_reuses_a_task_id_fails_the_task_with_invalid_replacement(client: Client) -> None:
    taken = await client.submit(sig("add", 1, 1))
    await taken.result(timeout=WAIT)
    failed = await fails(client, sig("replace_with_taken_id", taken.task_id))
    assert failed.error_type == "InvalidReplacement"
    assert taken.task_id in failed.message and "already exist" in failed.message


# -- test_canvas.py::test_chain ------------------------------------------------------------------


async def test_task_replaced_with_chain(client: Client) -> None:
    """test_chain::test_task_replaced_with_chain"""
    assert await run(client, si("replace_with_chain", 42)) == 42


async def test_chain_child_replaced_with_chain_first_middle_and_last(client: Client) -> None:
    """test_chain::test_chain_child_replaced_with_chain_first, _middle and _last"""
    assert await run(client, chain(si("replace_with_chain", 42), identity())) == 42
    assert await run(client, chain(identity(42), sig("replace_with_chain"), identity())) == 42
    assert await run(client, chain(identity(42), sig("replace_with_chain"))) == 42


async def test_chain_replaced_with_a_chain_and_a_callback(client: Client, cluster: Cluster) -> None:
    """test_chain::test_chain_replaced_with_a_chain_and_a_callback (and with_cb_replaced_with_chain_with_cb:
    the outer chain's callback gets its result)."""
    inner, outer = label(), label()
    flow = chain(identity("Hello "), sig("replace_with_chain", link_msg=inner), sig("add", f"world {outer}"))
    assert await run(client, flow.link(sig("note"))) == f"Hello world {outer}"
    await notes(cluster, inner, 1)
    await notes(cluster, f"Hello world {outer}", 1)


async def test_chain_with_eb_replaced_with_chain_with_eb(client: Client, cluster: Cluster) -> None:
    """test_chain::test_chain_replaced_with_a_chain_and_an_error_callback and
    test_chain_with_eb_replaced_with_chain_with_eb: the replacement's errback and the outer one run."""
    inner, outer = label(), label()
    flow = chain(identity("Hello "), sig("replace_with_chain_which_raises", link_msg=inner), sig("add", " never"))
    failed = await fails(client, flow.link_error(si("note", outer)))
    assert failed.error_type == "ValueError"
    await notes(cluster, inner, 1)
    await notes(cluster, outer, 1)


async def test_replace_chain_with_empty_chain(client: Client) -> None:
    """test_chain::test_replace_chain_with_empty_chain: Celery raises ImproperlyConfigured
    ("Cannot replace with an empty chain"); the server refuses it as InvalidReplacement."""
    failed = await fails(client, chain(identity(1), sig("replace_with_empty_chain")))
    assert failed.error_type == "InvalidReplacement" and "at least one step" in failed.message


async def test_chain_with_callback_child_replaced(client: Client, cluster: Cluster) -> None:
    """test_chain::test_chain_with_callback_child_replaced and test_chain_child_with_callback_replaced"""
    outer, child = label(), label()
    assert await run(client, chain(si("add_replaced", 42, 1337), identity()).link(si("note", outer))) == 1379
    replaced_child = si("add_replaced", 42, 1337).link(si("note", child))
    assert await run(client, chain(replaced_child, identity())) == 1379
    await notes(cluster, outer, 1)
    await notes(cluster, child, 1)


async def test_chain_with_errback_child_replaced(client: Client, cluster: Cluster) -> None:
    """test_chain::test_chain_with_errback_child_replaced and test_chain_child_with_errback_replaced"""
    outer, child = label(), label()
    failed = await fails(client, chain(si("add_replaced", 42, 1337), sig("fail")).link_error(si("note", outer)))
    assert failed.error_type == "ExpectedException"
    failed = await fails(client, chain(si("fail_replaced").link_error(si("note", child)), identity(42)))
    assert failed.error_type == "ExpectedException"
    await notes(cluster, outer, 1)
    await notes(cluster, child, 1)


# -- test_canvas.py::test_group, test_chord ------------------------------------------------------


async def test_group_child_replaced_with_chain(client: Client) -> None:
    """test_group::test_group_child_replaced_with_chain_first, _middle and _last"""
    assert await run(client, group(si("replace_with_chain", 42), identity(1337))) == [42, 1337]
    assert await run(client, group(identity(42), si("replace_with_chain", 1337), identity(7))) == [42, 1337, 7]
    assert await run(client, group(identity(42), si("replace_with_chain", 1337))) == [42, 1337]


async def test_chord_header_task_replaced_with_chain(client: Client) -> None:
    """test_chord::test_chord_header_task_replaced_with_chain and
    test_chord_header_child_replaced_with_chain_first and _last"""
    assert await run(client, chord([si("replace_with_chain", 42)], identity())) == [42]
    assert await run(client, chord([si("replace_with_chain", 42), identity(1337)], identity())) == [42, 1337]
    assert await run(client, chord([identity(42), si("replace_with_chain", 1337)], identity())) == [42, 1337]


async def test_chord_body_task_replaced_with_chain(client: Client) -> None:
    """test_chord::test_chord_body_task_replaced_with_chain and
    test_chord_body_chain_child_replaced_with_chain_first, _middle and _last"""
    assert await run(client, chord([identity(42)], sig("replace_with_chain"))) == [42]
    assert await run(client, chord([identity(42)], chain(sig("replace_with_chain"), identity()))) == [42]
    assert await run(client, chord([identity(42)], chain(identity(), sig("replace_with_chain"), identity()))) == [42]
    assert await run(client, chord([identity(42)], chain(identity(), sig("replace_with_chain")))) == [42]
