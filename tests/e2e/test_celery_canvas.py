"""Celery's canvas semantics on Conveyor: the cases of Celery's integration tests
(celery/t/integration/test_canvas.py, cited per test as `test_canvas.py::<class>::<test>`),
translated to Conveyor's SDK and run end to end (a server and a worker process) on SQLite and on
Redis (broker and backend, with a key prefix of their own).

Task replacement is in test_replace.py, priorities are left out (not built yet); map, starmap and
chunks come last.
Where Conveyor differs from Celery on purpose, the test says so and docs/canvas.md lists it: nested groups keep
their nesting (Celery flattens a group that is a group's only content), a failed chain step
cancels the steps after it, a group's error callback runs once unless `per_member=True`, and a
failed chord reads as ChordMemberFailed (naming the members' errors) rather than the first error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client, chain, chord, group, si, sig, state_name
from conveyor.canvas import Canvas
from conveyor.errors import TaskFailed
from tests.support.engine_cluster import Cluster, cluster_client, engine_cluster
from tests.support.processes import eventually, log_lines, settled

pytestmark = pytest.mark.timeout(240)

WAIT = 60.0
ENGINES = ["sqlite", "redis"]


@pytest.fixture(scope="class", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server whose broker and backend are both `param`, and one worker of canvas_tasks."""
    with engine_cluster(request, tmp_path_factory, module="tests.e2e.canvas_tasks", concurrency=8) as started:
        yield started


@dataclass
class Canvases:
    """A client of the cluster, and what its callbacks logged."""

    client: Client
    log_file: Path

    async def run(self, canvas: Canvas, **options: Any) -> Any:
        """Submit `canvas` (with Celery-style apply_async options) and wait for its whole result."""
        return await self.client.result(await self.client.submit(canvas, **options), wait=WAIT)

    async def fails(self, canvas: Canvas) -> TaskFailed:
        with pytest.raises(TaskFailed) as failed:
            await self.run(canvas)
        return failed.value

    async def count(self, label: str, expected: int) -> None:
        """Celery's await_redis_count: `expected` runs of note(label), and no more."""
        await eventually(lambda: len(self.lines(f"note {label}")) >= expected, WAIT, f"{expected} x note {label}")
        assert len(await settled(lambda: self.lines(f"note {label}"))) == expected

    async def errors(self, label: str, expected: int) -> list[str]:
        """The error callbacks labelled `label`, once `expected` ran: "error <label> <task id> <type>"."""
        await eventually(lambda: len(self.lines(f"error {label} ")) >= expected, WAIT, f"{expected} x error {label}")
        return await settled(lambda: self.lines(f"error {label} "))

    def lines(self, prefix: str) -> list[str]:
        return log_lines(self.log_file, prefix)


def label() -> str:
    return uuid.uuid4().hex[:10]


def identity(value: Any = None) -> Any:
    return si("identity", value)


class TestCeleryCanvas:
    @pytest.fixture
    async def canvas(self, cluster: Cluster) -> AsyncIterator[Canvases]:
        async with cluster_client(cluster) as client:
            yield Canvases(client, cluster.log_file)

    # -- test_link_error ---------------------------------------------------------------------------

    async def test_link_error(self, canvas: Canvases) -> None:
        """test_canvas.py::test_link_error::test_link_error_using_signature: the errback gets the
        error, naming the task that failed (was the errback's own id prefix)."""
        name = label()
        submitted = await canvas.client.submit(sig("fail", "test").link_error(sig("note_error", name)))
        with pytest.raises(TaskFailed) as failed:
            await canvas.client.result(submitted, wait=WAIT)
        assert failed.value.error_type == "ExpectedException"
        [line] = await canvas.errors(name, 1)
        assert line == f"error {name} {submitted.task_id} ExpectedException"
        errback = await canvas.client.result(f"{submitted.task_id}.err0", wait=WAIT)
        assert errback["task_id"] == submitted.task_id and "Task expected to fail" in errback["message"]

    # -- test_chain --------------------------------------------------------------------------------

    async def test_simple_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_simple_chain"""
        assert await canvas.run(sig("add", 4, 4) | sig("add", 8) | sig("add", 16)) == 32

    async def test_single_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_single_chain"""
        assert await canvas.run(chain(sig("add", 3, 4))) == 7

    async def test_complex_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_complex_chain (add_replaced as add: no replacement yet)"""
        flow = sig("add", 2, 2) | (sig("add", 4) | sig("add", 8) | sig("add", 16) | sig("add", 32)) | group(
            sig("add", i) for i in range(4))
        assert await canvas.run(flow) == [64, 65, 66, 67]

    async def test_group_results_in_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_group_results_in_chain. Celery unrolls a group whose
        only member is a chain ending in a group ([4, 5]); Conveyor keeps the nesting."""
        assert await canvas.run(group(sig("add", 1, 2) | group(sig("add", 1), sig("add", 2)))) == [[4, 5]]

    async def test_chain_on_error(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_on_error: the chain's result raises the failed
        step's error. Conveyor also ends the steps after it CANCELLED."""
        submitted = await canvas.client.submit(chain(sig("add", 1, 2), sig("fail"), sig("add", 3, 4)))
        with pytest.raises(TaskFailed) as failed:
            await canvas.client.result(submitted, wait=WAIT)
        assert failed.value.error_type == "ExpectedException" and failed.value.task_id == submitted.workflow_id
        last = await canvas.client.get_result(submitted.task_ids[-1], wait=WAIT)
        assert state_name(last.state) == "CANCELLED"

    async def test_chain_inside_group_receives_arguments(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_inside_group_receives_arguments"""
        flow = sig("add", 5, 6) | group(sig("add", 1) | sig("add", 2), sig("add", 3))
        assert await canvas.run(flow) == [14, 14]

    async def test_group_result_not_has_cache(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_group_result_not_has_cache"""
        flow = group(identity(1), identity(2), chain(identity(5), group(identity(3), identity(4))))
        assert await canvas.run(flow) == [1, 2, [3, 4]]

    async def test_nested_chain_group_lone_mid_and_last(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_nested_chain_group_lone, _mid and _last"""
        assert await canvas.run(chain(group(identity(42), identity(42)))) == [42, 42]
        assert await canvas.run(chain(identity(42), group(sig("identity"), sig("identity")), sig("identity"))) == [
            42, 42]
        assert await canvas.run(chain(identity(42), group(sig("identity"), sig("identity")))) == [42, 42]

    async def test_chain_error_handler_with_eta(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_error_handler_with_eta: an eta given at submit
        delays the whole canvas, which then runs as usual."""
        name = label()
        flow = chain(group(sig("add", 1, 2), sig("add", 3, 4)), sig("tsum")).link_error(si("note", name))
        eta = datetime.now(UTC) + timedelta(seconds=1)
        submitted = await canvas.client.submit(flow, eta=eta)
        assert await canvas.client.result(submitted, wait=WAIT) == 10
        first = await canvas.client.get_result(submitted.task_ids[0])
        assert first.started_at.ToDatetime(tzinfo=UTC) >= eta - timedelta(milliseconds=20)
        assert canvas.lines(f"note {name}") == []

    async def test_chain_children_with_callbacks(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_children_with_callbacks"""
        name = label()
        child = identity(1337).link(si("note", name))
        assert await canvas.run(chain(child for _ in range(42))) == 1337
        await canvas.count(name, 42)

    async def test_chain_children_with_errbacks(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_children_with_errbacks: only the first child runs."""
        name = label()
        child = si("fail").link_error(si("note", name))
        assert (await canvas.fails(chain(child for _ in range(42)))).error_type == "ExpectedException"
        await canvas.count(name, 1)

    async def test_chain_with_callback(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_with_callback_child_replaced (add as add_replaced)"""
        name = label()
        assert await canvas.run(chain(sig("add", 42, 1337), sig("identity")).link(si("note", name))) == 42 + 1337
        await canvas.count(name, 1)

    async def test_chain_with_errback(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_with_errback_child_replaced (add as add_replaced)"""
        name = label()
        failed = await canvas.fails(chain(sig("add", 42, 1337), sig("fail")).link_error(si("note", name)))
        assert failed.error_type == "ExpectedException"
        await canvas.count(name, 1)

    async def test_chain_of_a_chord_and_a_group_with_two_tasks(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chain::test_chain_of_a_chord_and_a_group_with_two_tasks and
        ::test_chain_of_chords_with_two_tasks"""
        start = si("add", 1, 0) | group(sig("add", 1), sig("add", 1)) | sig("tsum") | sig("add", 1)
        assert await canvas.run(start | group(sig("add", 1), sig("add", 1))) == [6, 6]
        assert await canvas.run(start | chord(group(sig("add", 1), sig("add", 1)), sig("tsum"))) == 12

    # -- test_group --------------------------------------------------------------------------------

    async def test_empty_group_result(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_empty_group_result: its result is [], and a watch by
        its workflow id works (it ends at once: there is no task)."""
        submitted = await canvas.client.submit(group())
        assert await canvas.client.result(submitted, wait=WAIT) == []
        assert [e async for e in canvas.client.watch(workflow_id=submitted.workflow_id)] == []

    async def test_nested_group(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_nested_group. Celery now flattens nested groups
        ([11, 101, 1001, 2001]); Conveyor keeps the nesting, as Celery did before 5.0."""
        flow = group(si("add", 1, 10), group(si("add", 1, 100), group(si("add", 1, 1000), si("add", 1, 2000))))
        assert await canvas.run(flow) == [11, [101, [1001, 2001]]]

    async def test_large_group(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_large_group"""
        assert await canvas.run(group(identity(i) for i in range(1000))) == list(range(1000))

    async def test_group_lone(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_group_lone"""
        assert await canvas.run(group(identity(42), identity(42))) == [42, 42]

    async def test_callback_called_by_group(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_callback_called_by_group: after the whole group."""
        name = label()
        assert await canvas.run(group(identity(42), identity(1337)).link(si("note", name))) == [42, 1337]
        await canvas.count(name, 1)

    async def test_errback_called_by_group_fail_first_and_last(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_errback_called_by_group_fail_first and _fail_last"""
        for members in ((sig("fail"), identity(42)), (identity(42), sig("fail"))):
            name = label()
            failed = await canvas.fails(group(*members).link_error(si("note", name)))
            assert failed.error_type == "GroupMemberFailed" and "ExpectedException" in failed.message
            await canvas.count(name, 1)

    async def test_errback_called_by_group_fail_multiple(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_errback_called_by_group_fail_multiple: Celery calls
        the errback once per failed member (42), as `per_member=True` does; by default Conveyor
        calls it once, naming every failed member."""
        per_member, once = label(), label()
        members = group(*(identity(42) for _ in range(24)), *(sig("fail") for _ in range(42)))
        submitted = await canvas.client.submit(
            members.link_error(sig("note_error", per_member), per_member=True).link_error(sig("note_error", once))
        )
        with pytest.raises(TaskFailed):
            await canvas.client.result(submitted, wait=WAIT)
        each = await canvas.errors(per_member, 42)
        assert {line.split()[2] for line in each} == set(submitted.task_ids[24:]), "one call per failed member"
        [single] = await canvas.errors(once, 1)
        assert single.split()[2:] == [submitted.task_ids[24], "GroupMemberFailed"]

    async def test_group_children_with_callbacks_and_errbacks(self, canvas: Canvases) -> None:
        """test_canvas.py::test_group::test_group_children_with_callbacks and _with_errbacks"""
        callback, errback = label(), label()
        assert await canvas.run(group(identity(1337).link(si("note", callback)) for _ in range(42))) == [1337] * 42
        await canvas.count(callback, 42)
        await canvas.fails(group(si("fail").link_error(si("note", errback)) for _ in range(42)))
        await canvas.count(errback, 42)

    # -- test_chord --------------------------------------------------------------------------------

    async def test_group_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_group_chain"""
        flow = sig("add", 2, 2) | group(sig("add", i) for i in range(4)) | sig("add_to_all", 8)
        assert await canvas.run(flow) == [12, 13, 14, 15]

    async def test_nested_group_chain(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_nested_group_chain"""
        flow = chain(
            si("add", 1, 0),
            group(si("add", 1, 100), chain(si("add", 1, 200), group(si("add", 1, 1000), si("add", 1, 2000)))),
            si("add", 1, 10),
        )
        assert await canvas.run(flow) == 11

    async def test_single_task_and_empty_header(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_single_task_header and ::test_empty_header_chord"""
        assert await canvas.run(chord([sig("add", 2, 5)], sig("add_to_all", 9))) == [16]
        assert await canvas.run(group(sig("add", 2, 5)) | sig("add_to_all", 9)) == [16]
        assert await canvas.run(chord([], sig("add_to_all", 9))) == []
        assert await canvas.run(group() | sig("add_to_all", 9)) == []

    async def test_nested_chord(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_nested_chord"""
        flow = chord([
            chord([sig("add", 1, 2), sig("add", 3, 4)], sig("add", [5])),
            chord([sig("add", 6, 7)], sig("add", [10])),
        ], sig("add_to_all", ["A"]))
        assert await canvas.run(flow) == [[3, 7, 5, "A"], [13, 10, "A"]]
        deep = group([group([group([group([sig("add", 1, 2)]) | sig("add", [3])]) | sig("add", [4])]) | sig(
            "add", [5])]) | sig("add", [6])
        assert await canvas.run(deep) == [[[[3, 3], 4], 5], 6]

    async def test_parallel_chords(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_parallel_chords"""
        one = chord(group(sig("add", 1, 2), sig("add", 3, 4)), sig("tsum"))
        assert await canvas.run(group(one, one)) == [10, 10]

    async def test_chord_in_chords_with_chains(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_chord_in_chords_with_chains"""
        inner = chain(si("add", 1, 2), chord(group(si("add", 1, 2), si("add", 1, 2)), si("add", 1, 2)))
        assert await canvas.run(chord(group(inner, inner), si("add", 2, 2))) == 4

    async def test_chain_chord_chain_chord(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_chain_chord_chain_chord"""
        flow = chain(identity(1), chord(
            [identity(2), chain(identity(3), chord([identity(4), identity(5)], identity(6)))], identity(7),
        ))
        assert await canvas.run(flow) == 7

    async def test_chord_in_chain_with_args(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_chord_in_chain_with_args (xfail in Celery, #6176):
        args given at submit reach every first task of the canvas."""
        flow = chain(chord([sig("identity"), sig("identity")], sig("identity")), sig("identity"))
        assert await canvas.run(flow, args=(1,)) == [1, 1]

    async def test_chain_in_chain_with_args(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_chain_in_chain_with_args (xfail in Celery, #6200)"""
        assert await canvas.run(chain(chain(sig("identity"), sig("identity"))), args=(1,)) == 1

    async def test_chain_to_a_chord_with_large_header(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_chain_to_a_chord_with_large_header"""
        flow = identity(1) | group(sig("identity") for _ in range(1000)) | sig("tsum")
        assert await canvas.run(flow) == 1000

    async def test_nested_chord_group(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_nested_chord_group ([42, 42] in Celery, which
        flattens the group) and ::test_nested_chord_group_chain_group_tail ([[42, 42]] in both)."""
        assert await canvas.run(chord([group(identity(42), identity(42))], sig("identity"))) == [[42, 42]]
        tail = chord(group(chain(identity(42), group(sig("identity"), sig("identity")))), sig("identity"))
        assert await canvas.run(tail) == [[42, 42]]

    async def test_error_propagates_from_chord(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_error_propagates_from_chord and _chord2"""
        first = await canvas.fails(sig("add", 1, 1) | sig("fail") | group(sig("add", 1), sig("add", 1)))
        assert first.error_type == "ExpectedException"
        second = await canvas.fails(sig("add", 1, 1) | sig("add", 1) | group(sig("add", 1), sig("fail")))
        assert second.error_type == "GroupMemberFailed" and "ExpectedException" in second.message

    async def test_error_propagates_to_chord_from_simple(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_error_propagates_to_chord_from_simple and
        ::test_immutable_errback_called_by_chord_from_simple: an errback linked to a chord is
        its body's, called once whether the header or the body failed."""
        header_errback, body_errback = label(), label()
        header = await canvas.fails(chord([sig("fail")], sig("identity")).link_error(si("note", header_errback)))
        assert header.error_type == "ChordMemberFailed" and "ExpectedException" in header.message
        body = await canvas.fails(chord([identity(42)], sig("fail")).link_error(si("note", body_errback)))
        assert body.error_type == "ExpectedException"
        await canvas.count(header_errback, 1)
        await canvas.count(body_errback, 1)

    async def test_errback_called_by_chord_from_group_fail_multiple(self, canvas: Canvases) -> None:
        """test_canvas.py::test_chord::test_immutable_errback_called_by_chord_from_group_fail_multiple:
        a failing group as the chord's header calls the chord's errback once; as its body, once
        per failed member with `per_member=True` (Celery's count), else once."""
        mixed = group(*(identity(42) for _ in range(24)), *(sig("fail") for _ in range(42)))
        header, body_each, body_once = label(), label(), label()
        await canvas.fails(chord([mixed], sig("identity")).link_error(si("note", header)))
        await canvas.count(header, 1)
        await canvas.fails(chord([identity(42)], mixed.link_error(si("note", body_each), per_member=True)))
        await canvas.count(body_each, 42)
        await canvas.fails(chord([identity(42)], mixed).link_error(si("note", body_once)))
        await canvas.count(body_once, 1)

    # -- canvas-wide options (Celery's apply_async(args, kwargs, **options)) -----------------------

    async def test_apply_async_options_apply_to_the_whole_canvas(self, canvas: Canvases) -> None:
        """Celery's canvas.apply_async(args=..., kwargs=..., countdown=...): args and kwargs go to
        the first tasks (each member of a group), a countdown delays the whole canvas."""
        assert await canvas.run(group(sig("add", 1), sig("add", 2)), args=(10,)) == [11, 12]
        assert await canvas.run(sig("add", 1) | sig("add", 2), kwargs={"y": 5}) == 8  # add(1, y=5), then + 2
        before = asyncio.get_running_loop().time()
        assert await canvas.run(sig("add", 1) | sig("add", 2), args=(10,), countdown=1.0) == 13
        assert asyncio.get_running_loop().time() - before >= 1.0

    # -- map, starmap, chunks (Celery's task.map, task.starmap, task.chunks) -----------------------

    async def test_map_and_starmap_give_one_result_per_item(self, canvas: Canvases) -> None:
        assert await canvas.run(sig("identity").map([1, "a", None, [2]], chunk_size=3)) == [1, "a", None, [2]]
        assert await canvas.run(sig("add").starmap([(1, 2), (3, 4), ("a", "b")])) == [3, 7, "ab"]
        assert await canvas.run(sig("add").starmap([(1, 2), (3, 4)], chunk_size=1) | sig("tsum")) == 10

    async def test_chunks_of_ten_thousand_items_run_as_bounded_chunk_tasks(self, canvas: Canvases) -> None:
        submitted = await canvas.client.submit(sig("add").chunks(((i, i) for i in range(10_000)), 100))
        assert len(submitted.task_ids) == 100
        result = await canvas.client.result(submitted, wait=WAIT)
        assert result == [[2 * i for i in range(start, start + 100)] for start in range(0, 10_000, 100)]
        first = await canvas.client.get_result(submitted.task_ids[0])
        assert len(first.signature.args) == 100, "a chunk task's message holds its own items only"

    async def test_a_failed_map_item_fails_the_map_and_its_error_callback_runs_once(self, canvas: Canvases) -> None:
        name = label()
        failed = await canvas.fails(sig("fail").map([1, 2, 3], chunk_size=2).link_error(sig("note_error", name)))
        assert failed.error_type == "GroupMemberFailed" and "ExpectedException" in str(failed)
        [line] = await canvas.errors(name, 1)
        assert line.endswith(" GroupMemberFailed")
