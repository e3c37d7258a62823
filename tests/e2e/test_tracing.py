"""One trace from submit through dispatch, execution, a retry and a chord callback.

Server, worker and client run in this process so one in-memory exporter sees every span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import Client, RetryPolicy, Worker, chord, current_task, sig
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.support.processes import eventually

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    yield EXPORTER


@pytest.fixture
async def address(exporter: InMemorySpanExporter) -> AsyncIterator[str]:
    server = ConveyorServer(Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://"))
    port = await server.start()
    worker = Worker(f"127.0.0.1:{port}", concurrency=4)

    @worker.task("square")
    def square(x: int) -> int:
        return x * x

    @worker.task("flaky_square")
    def flaky_square(x: int) -> int:
        if current_task().attempt == 1:
            raise RuntimeError("first attempt fails")
        return x * x

    @worker.task("total")
    def total(values: list[int]) -> int:
        return sum(values)

    running = asyncio.create_task(worker.run())
    yield f"127.0.0.1:{port}"
    worker.stop()
    await running
    await server.stop()


def by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def finished(exporter: InMemorySpanExporter, name: str) -> int:
    """How many spans named `name` have ended."""
    return sum(span.name == name for span in exporter.get_finished_spans())


def parent_name(span: ReadableSpan, index: dict[int, ReadableSpan]) -> str:
    assert span.parent is not None, f"{span.name} has no parent"
    return index[span.parent.span_id].name


async def test_chord_with_a_retry_is_one_trace(address: str, exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    retry = RetryPolicy(max_attempts=3, backoff="fixed", initial=0.05)
    flow = chord([sig("square", 2), sig("flaky_square", 3).set(retry=retry)], sig("total"))
    async with Client(address) as client:
        submitted = await client.submit(flow)
        assert await client.result(submitted.task_id, wait=20) == 13
    # The last result span closes right after the result is stored.
    await eventually(lambda: finished(exporter, "result total") == 1, 10, "the callback's result span ended")

    spans = list(exporter.get_finished_spans())
    names = sorted(s.name for s in spans)
    assert len({s.context.trace_id for s in spans}) == 1, f"several traces: {names}"
    index = by_id(spans)
    (root,) = [s for s in spans if s.parent is None]
    assert root.name == "submit workflow"
    (server_submit,) = [s for s in spans if s.name == "submit"]
    assert parent_name(server_submit, index) == "submit workflow"

    for task in ("square", "flaky_square", "total"):
        dispatches = [s for s in spans if s.name == f"dispatch {task}"]
        executes = [s for s in spans if s.name == f"execute {task}"]
        results = [s for s in spans if s.name == f"result {task}"]
        expected = 2 if task == "flaky_square" else 1  # the retry is a second attempt in the same trace
        assert len(dispatches) == len(executes) == len(results) == expected, names
        for span in dispatches + results:
            assert parent_name(span, index) == "submit"
        for span in executes:
            assert parent_name(span, index) == f"dispatch {task}"
    failed = [s for s in spans if s.name == "execute flaky_square" and not s.status.is_ok]
    assert len(failed) == 1
    assert [s for s in spans if s.name.startswith("enqueue ")], "publishing is traced"


async def test_chain_steps_and_callbacks_share_the_trace(address: str, exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    async with Client(address) as client:
        first = await client.submit(sig("square", 2) | sig("square") | sig("square").link(sig("square")))
        assert await client.result(first.task_id, wait=20) == 256
        assert await client.result(f"{first.task_id}.ok0", wait=20) == 256 * 256
    await eventually(lambda: finished(exporter, "result square") == 4, 10, "the four result spans ended")
    spans = list(exporter.get_finished_spans())
    assert len({s.context.trace_id for s in spans}) == 1
    assert len([s for s in spans if s.name == "execute square"]) == 4
