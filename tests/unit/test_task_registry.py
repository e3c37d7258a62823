"""The typed task registry (issue #15, item 2): call schemas derived from type hints, what a
strict submit refuses and how it names the field, json_values that are not JSON refused in every
mode, and the registry kept across two replicas over one backend (tests/unit/replicas.py):
written at Hello, rewritten each beat, marked gone on leave, stale when a replica stops
rewriting, pruned past the retention."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest

from conveyor import chain, chord, group, si, sig
from conveyor.client import to_request
from conveyor.schema import task_info, task_infos
from conveyor.v1 import admin_service_pb2, task_pb2, task_service_pb2, worker_service_pb2
from conveyor.values import to_value_map, to_values
from conveyor_server.app import Core
from conveyor_server.cli import tasks_table
from conveyor_server.core import task_schemas
from conveyor_server.core.call_schemas import call_of, compiled, mismatch
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.task_registry import REGISTRY_GROUP, STALE_AFTER_BEATS
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, submit

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


# -- tasks as a Python worker declares them ----------------------------------------------------------

def add(x: int, y: int = 0, *, scale: float = 1.0) -> int:
    """Adds two integers.

    The rest of the docstring is not part of the description."""
    return int((x + y) * scale)


def mul(x: int, y: int) -> int:
    return x * y


def total(results: list[int], bonus: int = 0) -> int:
    return sum(results) + bonus


def report(error: dict[str, Any], channel: str) -> None:
    """Called with the error of a failed task."""


def shapes(items: list[int], weights: dict[str, float], tag: str | None = None,
           mode: Literal["fast", "slow"] = "fast", blob: bytes = b"", pair: tuple[int, str] = (0, "")) -> None:
    """Containers, optionals, literals, bytes and tuples."""


def anything(first, *rest, **options):  # type: ignore[no-untyped-def]
    """No hints, *args and **kwargs: any call."""


def keyed(*, key: str) -> None:
    """A required keyword-only parameter."""


def positional(a: int, /) -> None:
    """A positional-only parameter."""


def undefined_hint(x: UnknownName) -> None:  # type: ignore[name-defined]  # noqa: F821
    """A hint that names nothing: its parameter is not typed."""


TASKS: dict[str, Callable[..., Any]] = {"add": add, "mul": mul, "total": total, "report": report}


def check(function: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """How a call of `function` breaks the schema the SDK derives for it (None: it matches)."""
    info = task_info("t", function)
    call = call_of(task_pb2.Signature(name="t", args=to_values(args), kwargs=to_value_map(kwargs)), leading=False)
    return mismatch(compiled(info.call_schema), call, leading=False)


# -- schemas derived from type hints ---------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs", [
    ((1, 2), {}), ((1,), {}), ((), {"x": 1}), ((1,), {"y": 2}), ((1,), {"scale": 0.5}), ((1, 2), {"scale": 2}),
])
def test_a_typed_function_accepts_every_call_python_would_bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    assert check(add, *args, **kwargs) is None


@pytest.mark.parametrize("args, kwargs, problem", [
    ((1, "abc"), {}, "args[1]: 'abc' is not of type 'integer'"),
    ((1.5,), {}, "args[0]: 1.5 is not of type 'integer'"),
    ((1.0,), {}, "args[0]: 1.0 is not of type 'integer'"),  # a double is never an integer
    ((True,), {}, "args[0]: True is not of type 'integer'"),
    ((), {}, "kwargs: 'x' is a required property"),
    ((1, 2, 3), {}, "args: Expected at most 2 items but found 1 extra: 3"),
    ((1,), {"z": 1}, "kwargs: Additional properties are not allowed ('z' was unexpected)"),
    ((1,), {"scale": "big"}, "kwargs['scale']: 'big' is not of type 'number'"),
])
def test_a_call_that_does_not_match_is_described_by_its_field(
    args: tuple[Any, ...], kwargs: dict[str, Any], problem: str
) -> None:
    assert check(add, *args, **kwargs) == problem


def test_containers_optionals_literals_bytes_and_tuples_are_typed() -> None:
    assert check(shapes, [1, 2], {"a": 1.5}, None, "slow", b"\x00\xff", [1, "one"]) is None
    assert check(shapes, [1, "x"], {}) == "args[0][1]: 'x' is not of type 'integer'"
    assert check(shapes, [], {"a": "heavy"}) == "args[1]['a']: 'heavy' is not of type 'number'"
    assert check(shapes, [], {}, tag=3) == "kwargs['tag']: 3 is not valid under any of the given schemas"
    assert check(shapes, [], {}, mode="medium") == "kwargs['mode']: 'medium' is not one of ['fast', 'slow']"
    assert check(shapes, [], {}, pair=[1, 2]) == "kwargs['pair'][1]: 2 is not of type 'string'"
    assert check(shapes, [], {}, pair=[1]) == "kwargs['pair']: [1] is too short"


def test_missing_hints_star_args_and_unreadable_hints_accept_any_value() -> None:
    assert check(anything, 1, "two", [3], four={"x": 4}) is None
    assert check(anything) == "kwargs: 'first' is a required property"
    assert check(undefined_hint, {"any": "thing"}) is None
    assert check(undefined_hint) == "kwargs: 'x' is a required property"


def test_keyword_only_and_positional_only_parameters_bind_as_python_binds_them() -> None:
    assert check(keyed, key="k") is None
    assert check(keyed) == "kwargs: 'key' is a required property"
    assert check(keyed, "k", key="k") == "args: Expected at most 0 items but found 1 extra: 'k'"
    assert check(positional, 1) is None
    assert check(positional) == "args: [] should be non-empty"
    assert check(positional, a=1) == "kwargs: Additional properties are not allowed ('a' was unexpected)"


def test_the_description_is_the_docstrings_first_line_unless_given() -> None:
    assert task_info("add", add).description == "Adds two integers."
    assert task_info("mul", mul).description == ""
    assert task_info("add", add, "Sums").description == "Sums"
    assert [info.name for info in task_infos(TASKS, {"mul": "Multiplies"})] == ["add", "mul", "report", "total"]
    assert task_infos(TASKS, {"mul": "Multiplies"})[1].description == "Multiplies"
    assert json.loads(task_info("add", add).call_schema)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


# -- strict submits on one replica -----------------------------------------------------------------


def hello(
    worker_id: str = "w1", tasks: dict[str, Callable[..., Any]] | None = None, **fields: Any
) -> worker_service_pb2.Hello:
    """The Hello of a Python worker that registered `tasks` (default TASKS)."""
    registered = TASKS if tasks is None else tasks
    return worker_service_pb2.Hello(
        worker_id=worker_id,
        queues=[QUEUE],
        max_in_flight=10,
        task_names=sorted(registered),
        tasks=task_infos(registered, {}),
        **fields,
    )


def strict(canvas: Any) -> task_service_pb2.SubmitRequest:
    request = to_request(canvas)
    request.strict = True
    return request


async def refusal(core: Core, *requests: task_service_pb2.SubmitRequest) -> str:
    with pytest.raises(InvalidArgument) as refused:
        await submit(core, *requests)
    return str(refused.value)


async def no_requests() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
    return
    yield


async def leave(core: Core, session: WorkerSession) -> None:
    """The worker's stream ends: the server runs its leaving path, registry writes included."""
    await core.connections.run(session, no_requests())
    await core.task_registry.written()


async def test_a_strict_submit_of_a_name_no_worker_registered_is_refused(replicas: Replicas) -> None:
    core = replicas.a
    assert await refusal(core, strict(sig("nope", 1))) == (
        "request.task: no worker has registered task 'nope' (a strict submit needs one)"
    )
    core.connections.open(hello())
    assert await refusal(core, strict(sig("nope", 1))) == (
        "request.task: no worker has registered task 'nope' (a strict submit needs one)"
    )
    assert await submit(core, to_request(sig("nope", 1))), "without strict it is accepted (and waits)"


async def test_a_strict_submit_refuses_args_that_do_not_match_and_stores_nothing(replicas: Replicas) -> None:
    core = replicas.a
    core.connections.open(hello())
    bad = sig("add", 1, "abc").set(id="t-bad")
    assert await refusal(core, strict(bad)) == "request.task.args[1]: 'abc' is not of type 'integer' (task 'add')"
    assert not await core.store.load(["t-bad"])
    [accepted] = await submit(core, strict(sig("add", 1, 2)), )
    assert accepted.task_id
    assert await submit(core, to_request(bad)), "without strict the call is not checked"


async def test_the_strict_tasks_setting_checks_every_submit_and_a_batch_names_the_request(
    replicas: Replicas
) -> None:
    core = replicas.a
    core.connections.open(hello())
    core.submitter.checks.strict_tasks = True  # type: ignore[union-attr]
    problem = await refusal(core, to_request(sig("add", 1)), to_request(sig("mul", 2)))
    assert problem == "requests[1].task.kwargs: 'y' is a required property (task 'mul')"


async def test_every_task_of_a_workflow_is_checked_and_a_previous_result_counts_as_given(
    replicas: Replicas
) -> None:
    core = replicas.a
    core.connections.open(hello())
    # mul(10) receives add's result as its x; total receives the members' results as its list.
    assert await submit(core, strict(chain(sig("add", 1, 2), sig("mul", 10), sig("add", 5))))
    assert await submit(core, strict(chord([sig("add", 1), sig("mul", 2, 3)], sig("total", bonus=1))))
    assert await submit(core, strict(sig("add", 1).link(sig("mul", 3)).link_error(sig("report", "ops"))))
    cases = {
        "request.workflow.chain[1].args[0]: 'x' is not of type 'integer' (task 'mul')":
            chain(sig("add", 1, 2), sig("mul", "x")),
        "request.workflow.chain[1].kwargs: 'y' is a required property (task 'mul')":
            chain(sig("add", 1, 2), si("mul", 10)),  # immutable: no previous result
        "request.workflow.group[1].args[1]: 'b' is not of type 'integer' (task 'add')":
            group(sig("add", 1), sig("add", 1, "b")),
        "request.workflow.chord.callback.kwargs['bonus']: 'x' is not of type 'integer' (task 'total')":
            chord([sig("add", 1)], sig("total", bonus="x")),
        "request.workflow.chord.header[0]: no worker has registered task 'sub' (a strict submit needs one)":
            chord([sig("sub", 1)], sig("total")),
        "request.task.on_error[0].kwargs: 'channel' is a required property (task 'report')":
            sig("add", 1).link_error(sig("report")),
        "request.workflow.chain.on_error[0]: no worker has registered task 'alert' (a strict submit needs one)":
            chain(sig("add", 1), sig("mul", 2)).link_error(sig("alert")),
    }
    for problem, canvas in cases.items():
        assert await refusal(core, strict(canvas)) == problem


def in_a_chord_header() -> task_service_pb2.SubmitRequest:
    made = strict(chord([sig("add", 1)], sig("total")))
    made.workflow.chord.header.on_member_error.add(name="nope")
    return made


UNKNOWN = "no worker has registered task 'nope' (a strict submit needs one)"


@pytest.mark.parametrize("request_, problem", [
    (strict(chain(sig("add", 1), sig("mul", 2)).link(sig("nope"))), f"request.workflow.chain.on_success[0]: {UNKNOWN}"),
    (strict(group(sig("add", 1)).link(sig("nope"))), f"request.workflow.group.on_success[0]: {UNKNOWN}"),
    (strict(group(sig("add", 1)).link_error(sig("nope"), per_member=True)),
     f"request.workflow.group.on_member_error[0]: {UNKNOWN}"),
    (strict(group(sig("add", 1)).link_error(sig("report", "ops").link(sig("nope")), per_member=True)),
     f"request.workflow.group.on_member_error[0].on_success[0]: {UNKNOWN}"),
    (strict(group(sig("add", 1)).link(sig("total", bonus="x"))),
     "request.workflow.group.on_success[0].kwargs['bonus']: 'x' is not of type 'integer' (task 'total')"),
    (in_a_chord_header(), f"request.workflow.chord.header.on_member_error[0]: {UNKNOWN}"),
], ids=["chain.on_success", "group.on_success", "group.on_member_error", "a link of a member errback",
        "group.on_success args", "chord.header.on_member_error"])
async def test_a_strict_submit_checks_every_callback_list_of_a_canvas(
    replicas: Replicas, request_: task_service_pb2.SubmitRequest, problem: str
) -> None:
    core = replicas.a
    core.connections.open(hello())
    assert await refusal(core, request_) == problem


async def test_canvas_callbacks_are_checked_with_the_result_or_error_they_receive_as_given(
    replicas: Replicas
) -> None:
    core = replicas.a
    core.connections.open(hello())
    assert await submit(core, strict(chain(sig("add", 1), sig("mul", 2)).link(sig("mul", 3))))
    assert await submit(core, strict(group(sig("add", 1)).link(sig("total")).link_error(sig("report", "ops"),
                                                                                         per_member=True)))


async def test_a_json_value_that_is_not_json_is_refused_in_every_mode(replicas: Replicas) -> None:
    core = replicas.a
    broken = task_pb2.Signature(name="any", args=[task_pb2.Value(json_value="{not json")])
    problem = await refusal(core, task_service_pb2.SubmitRequest(task=broken))
    assert problem.startswith("request.task.args[0]: json_value is not valid JSON (Expecting property name")
    not_a_number = task_pb2.Signature(name="any", kwargs={"k": task_pb2.Value(json_value="[NaN]")})
    assert await refusal(core, task_service_pb2.SubmitRequest(task=not_a_number)) == (
        "request.task.kwargs['k']: json_value is not valid JSON (NaN is not JSON)"
    )
    deep = task_pb2.Signature(name="any", args=[task_pb2.Value(json_value="[" * 100_000)])
    assert "nests too deeply" in await refusal(core, task_service_pb2.SubmitRequest(task=deep))
    in_a_chain = to_request(chain(sig("a"), sig("b")))
    in_a_chain.workflow.chain.steps[1].task.args.add(json_value="nul")
    assert (await refusal(core, in_a_chain)).startswith("request.workflow.chain[1].args[0]: json_value is not valid")
    assert await submit(core, to_request(sig("any", [1, {"a": None}], key={"b": [True]})))


BROKEN = task_pb2.Value(json_value="{not json")


def broken_at(canvas: Any, where: Callable[[task_service_pb2.SubmitRequest], None]) -> task_service_pb2.SubmitRequest:
    made = canvas if isinstance(canvas, task_service_pb2.SubmitRequest) else to_request(canvas)
    where(made)
    return made


@pytest.mark.parametrize("request_, field", [
    (broken_at(chain(sig("a"), sig("b")).link(sig("ok")), lambda r: r.workflow.chain.on_success[0].args.append(BROKEN)),
     "request.workflow.chain.on_success[0].args[0]"),
    (broken_at(group(sig("a")).link(sig("ok")), lambda r: r.workflow.group.on_success[0].kwargs["k"].CopyFrom(BROKEN)),
     "request.workflow.group.on_success[0].kwargs['k']"),
    (broken_at(group(sig("a")).link_error(sig("each"), per_member=True),
               lambda r: r.workflow.group.on_member_error[0].args.extend([to_values([1])[0], BROKEN])),
     "request.workflow.group.on_member_error[0].args[1]"),
    # Submit options are checked as given, whether they reach a task (a chain's first step) or none.
    (broken_at(chain(sig("a"), sig("b")), lambda r: r.options.args.append(BROKEN)), "request.options.args[0]"),
    (broken_at(task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="a", immutable=True)),
               lambda r: r.options.kwargs["k"].CopyFrom(BROKEN)),
     "request.options.kwargs['k']"),
    (broken_at(si("a"), lambda r: r.options.args.extend([to_values([1])[0], BROKEN])), "request.options.args[1]"),
], ids=["chain.on_success", "group.on_success", "group.on_member_error", "options.args", "options.kwargs",
        "options.args that reach no task"])
async def test_a_json_value_that_is_not_json_is_refused_in_canvas_callbacks_and_submit_options(
    replicas: Replicas, request_: task_service_pb2.SubmitRequest, field: str
) -> None:
    problem = await refusal(replicas.a, request_)
    assert problem.startswith(f"{field}: json_value is not valid JSON (Expecting property name")


async def test_a_hello_whose_schema_is_not_a_json_schema_is_refused_and_registers_nothing(
    replicas: Replicas
) -> None:
    connections = replicas.a.connections
    cases = {
        "hello.tasks[0].call_schema is not a valid JSON Schema (type: 5 is not valid under any of the given schemas)":
            task_pb2.TaskInfo(name="t", call_schema='{"type": 5}'),
        "hello.tasks[0].call_schema is not JSON (Expecting value: line 1 column 1 (char 0))":
            task_pb2.TaskInfo(name="t", call_schema="not json"),
        "hello.tasks[0].call_schema must be a JSON object (or true or false), not list":
            task_pb2.TaskInfo(name="t", call_schema="[]"),
        "hello.tasks[0].name is empty": task_pb2.TaskInfo(description="nameless"),
    }
    for problem, info in cases.items():
        with pytest.raises(InvalidArgument) as refused:
            connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1, tasks=[info]))
        assert str(refused.value) == problem
    assert not replicas.a.registry.sessions
    assert await replicas.a.admin.registered_tasks() == []


async def test_names_without_a_schema_accept_any_call_and_a_call_matching_any_variant_passes(
    replicas: Replicas
) -> None:
    core = replicas.a
    core.connections.open(worker_service_pb2.Hello(worker_id="raw", max_in_flight=1, task_names=["raw.echo"]))
    assert await submit(core, strict(sig("raw.echo", "anything", at=[1])))

    def add_text(x: str, y: str = "") -> str:
        return x + y

    core.connections.open(hello("w1", {"add": add}))
    core.connections.open(hello("w2", {"add": add_text}))  # a rolling deploy changes the types
    assert await submit(core, strict(sig("add", 1, 2)), strict(sig("add", "a", "b")))
    assert "is not of type" in await refusal(core, strict(sig("add", 1, "b")))
    [listed] = [t for t in await core.admin.registered_tasks() if t.name == "add"]
    assert listed.schema_variants == 2 and listed.worker_ids == ["w1", "w2"]


# -- the registry across two replicas ----------------------------------------------------------------

async def test_a_worker_on_one_replica_counts_for_strict_submits_and_listings_on_the_other(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await replicas.b.task_registry.load()  # B read the registry before the worker came
    replicas.a.connections.open(hello("w1", TASKS, language="python"))
    await replicas.a.task_registry.written()
    # B's snapshot predates the worker: B reads the registry again before it would refuse.
    monkeypatch.setattr(task_schemas, "RELOAD_BEFORE_REFUSING_SECONDS", 0.0)
    assert await submit(replicas.b, strict(sig("add", 1, 2)))
    assert await refusal(replicas.b, strict(sig("mul", 1))) == (
        "request.task.kwargs: 'y' is a required property (task 'mul')"
    )
    listed = {t.name: t for t in await replicas.b.admin.registered_tasks()}
    assert sorted(listed) == ["add", "mul", "report", "total"]
    assert listed["add"].description == "Adds two integers."
    assert listed["add"].call_schema == task_info("add", add).call_schema
    assert listed["add"].schema_variants == 1
    assert [list(listed["add"].queues), list(listed["add"].languages), list(listed["add"].worker_ids)] == [
        [QUEUE], ["python"], ["w1"]
    ]


async def test_a_worker_that_leaves_stays_known_but_is_no_longer_live(replicas: Replicas) -> None:
    session = replicas.a.connections.open(hello("w1", {"add": add}))
    await replicas.a.task_registry.refresh()
    await leave(replicas.a, session)
    [listed] = await replicas.b.admin.registered_tasks()
    assert listed.name == "add" and listed.worker_ids == [] and listed.last_seen.seconds > 0
    assert await submit(replicas.b, strict(sig("add", 1))), "a task whose workers are away is still known"


async def test_a_replica_that_stops_rewriting_leaves_its_workers_stale_then_forgotten(replicas: Replicas) -> None:
    a, b = replicas.a.task_registry, replicas.b.task_registry
    a.clock = b.clock = replicas.clock
    replicas.a.connections.open(hello("w1", {"add": add}))
    await a.refresh()
    assert [t.worker_ids for t in await b.listed()] == [["w1"]]
    replicas.clock.now += STALE_AFTER_BEATS * b.beat_seconds + 1  # A died: nobody rewrites w1's entry
    assert [t.worker_ids for t in await b.listed()] == [[]]
    await b.refresh()
    assert len(await replicas.backend.members(REGISTRY_GROUP)) == 1, "stale but the only record of 'add'"
    replicas.clock.now += b.retention_seconds
    await b.refresh()
    assert await replicas.backend.members(REGISTRY_GROUP) == {}
    assert await refusal(replicas.b, strict(sig("add", 1))) == (
        "request.task: no worker has registered task 'add' (a strict submit needs one)"
    )


async def test_each_beat_rewrites_an_entry_under_a_new_generation_and_leftovers_are_pruned(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = replicas.a.task_registry
    replicas.a.connections.open(hello("w1", {"add": add}))
    for _ in range(3):
        await registry.refresh()
    [member] = await replicas.backend.members(REGISTRY_GROUP)
    assert member.endswith(".0000000003")
    removed: list[str] = []

    async def lost_remove(group: str, name: str) -> None:
        removed.append(name)  # the engine lost the call: the older generation stays

    monkeypatch.setattr(replicas.backend, "remove_member", lost_remove)
    await registry.refresh()
    assert len(await replicas.backend.members(REGISTRY_GROUP)) == 2
    monkeypatch.undo()
    await replicas.b.task_registry.refresh()  # any replica prunes it
    assert list(await replicas.backend.members(REGISTRY_GROUP)) == [member[:-10] + "0000000004"]


async def test_a_gone_entry_is_pruned_once_a_live_worker_covers_its_names(replicas: Replicas) -> None:
    session = replicas.a.connections.open(hello("w1", {"add": add, "mul": mul}))
    await replicas.a.task_registry.refresh()
    await leave(replicas.a, session)
    replicas.b.connections.open(hello("w2", {"add": add}))
    await replicas.b.task_registry.refresh()
    assert len(await replicas.backend.members(REGISTRY_GROUP)) == 2, "w1 is still the only record of 'mul'"
    replicas.b.connections.open(hello("w3", {"mul": mul}))
    await replicas.b.task_registry.refresh()
    entries = await replicas.backend.members(REGISTRY_GROUP)
    assert len(entries) == 2, "w1's gone entry went once w2 and w3 covered its names"
    assert {t.name: t.worker_ids for t in await replicas.a.admin.registered_tasks()} == {
        "add": ["w2"], "mul": ["w3"]
    }


def test_the_tasks_table_shows_live_workers_queues_languages_and_schemas() -> None:
    live = admin_service_pb2.RegisteredTask(
        name="add", description="Adds two integers.", call_schema="{}", schema_variants=1, queues=["default"],
        languages=["node", "python"], worker_ids=["w1", "w2"],
    )
    away = admin_service_pb2.RegisteredTask(name="raw.echo", queues=["q"], languages=["go"])
    away.last_seen.FromSeconds(1_000)
    lines = tasks_table([live, away], now=1_090).splitlines()
    assert lines[0].split() == ["NAME", "LIVE", "QUEUES", "LANGUAGES", "LAST", "SEEN", "SCHEMA", "DESCRIPTION"]
    assert lines[1].split() == ["add", "2", "default", "node,python", "now", "typed", "Adds", "two", "integers."]
    assert lines[2].split() == ["raw.echo", "0", "q", "go", "1m30s", "ago", "-"]
    assert tasks_table([]).startswith("no task registered")
