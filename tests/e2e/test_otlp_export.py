"""One trace across processes and languages, exported the standard way: a `conveyor serve`, a
`conveyor worker` and the Node worker, each configured only by OTEL_* variables, send their spans
to a real OTLP gRPC receiver that this test serves on loopback.

Needs `node` and workers/node/node_modules (`npm ci` in workers/node); skipped without them.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conveyor import Client, chain, chord, sig
from tests.support.processes import REPO, Proc, Server, WorkerProc, wait_for, wait_for_workers

NODE_DIR = REPO / "workers" / "node"
NODE = shutil.which("node")
NODE_QUEUE = "node"

pytestmark = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "@opentelemetry" / "sdk-node").is_dir(),
    reason="needs `node` on PATH and workers/node/node_modules (run `npm ci` in workers/node)",
)


@dataclass(frozen=True)
class Exported:
    """One span as received, with the service that sent it."""

    service: str
    span: Span

    @property
    def attributes(self) -> dict[str, object]:
        return {kv.key: _plain(kv.value) for kv in self.span.attributes}


def _plain(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP TraceService that keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Exported] = []

    def Export(  # the generated service's method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[Exported] = []
        for resource_spans in request.resource_spans:
            service = next((_plain(kv.value) for kv in resource_spans.resource.attributes
                            if kv.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                received.extend(Exported(str(service), span) for span in scope_spans.spans)
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Exported]:
        with self._lock:
            return list(self._spans)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    received = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # opentelemetry-proto's grpc module ships without type hints.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")  # a free port, chosen now
    server.start()
    yield received, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


def otel_env(endpoint: str) -> dict[str, str]:
    """Only standard variables; a short batch delay so spans arrive while the test waits."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_LOGS_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
    }


@pytest.fixture
def address(tmp_path: Path, procs: list[Proc], receiver: tuple[Receiver, str]) -> str:
    env = otel_env(receiver[1])
    db = tmp_path / "conveyor.db"
    server = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", env=env)
    procs.append(server)
    procs.append(WorkerProc(tmp_path, server.address, module="tests.e2e.py_tasks", env=env, name="py-worker"))
    assert NODE is not None
    node_argv = [NODE, str(NODE_DIR / "example.js"), "--address", server.address, "--queue", NODE_QUEUE]
    procs.append(Proc(node_argv, tmp_path / f"node-worker-{time.monotonic_ns()}.log", env))
    wait_for_workers(server.address, 2)
    return server.address


def trace_of(receiver: Receiver, wanted: set[tuple[str, str]]) -> list[Exported]:
    """Every span of the trace of the `wanted` spans (name, task id), once they all arrived."""
    def complete() -> list[Exported] | None:
        spans = receiver.spans()
        arrived = {(s.span.name, str(s.attributes.get("messaging.message.id"))): s for s in spans}
        if not wanted <= arrived.keys():
            return None
        trace_id = arrived[next(iter(wanted))].span.trace_id
        return [s for s in spans if s.span.trace_id == trace_id]

    wait_for(complete, 20, f"the spans {sorted(wanted)}")
    return complete() or []


def only(spans: list[Exported], name: str, task_id: str) -> Exported:
    (found,) = [s for s in spans if s.span.name == name and s.attributes.get("messaging.message.id") == task_id]
    return found


async def test_a_python_node_python_chain_is_one_trace(address: str, receiver: tuple[Receiver, str]) -> None:
    flow = chain(sig("py.add", 1, 2), sig("node.mul", 10).set(queue=NODE_QUEUE), sig("py.add", 5))
    async with Client(address) as client:
        submitted = await client.submit(flow)
        assert await client.result(submitted.task_id, wait=30) == 35
    steps = list(zip(submitted.task_ids, ["py.add", "node.mul", "py.add"], strict=True))
    spans = trace_of(receiver[0], {
        (f"{kind} {name}", task_id) for task_id, name in steps for kind in ("dispatch", "execute", "result")
    })

    assert len({s.span.trace_id for s in spans}) == 1
    (submit,) = [s for s in spans if s.span.name == "submit"]
    assert submit.service == "conveyor-server"
    for task_id, name in steps:
        dispatch = only(spans, f"dispatch {name}", task_id)
        execute = only(spans, f"execute {name}", task_id)
        result = only(spans, f"result {name}", task_id)
        assert dispatch.span.parent_span_id == submit.span.span_id
        assert result.span.parent_span_id == submit.span.span_id
        assert execute.span.parent_span_id == dispatch.span.span_id, f"execute {name} is not the dispatch's child"
        expected_service = "conveyor-node-worker" if name.startswith("node.") else "conveyor-worker"
        assert execute.service == expected_service
        queue = NODE_QUEUE if name.startswith("node.") else "default"
        for span, operation in ((dispatch, "receive"), (execute, "process"), (result, "settle")):
            attributes = span.attributes
            assert attributes["messaging.system"] == "conveyor"
            assert attributes["messaging.operation.type"] == operation
            assert attributes["messaging.destination.name"] == queue
            assert attributes["conveyor.task.name"] == name
            assert attributes["conveyor.attempt"] == 1


async def test_a_chord_callback_links_to_every_member(address: str, receiver: tuple[Receiver, str]) -> None:
    members = [sig("py.add", 1, 1), sig("node.mul", 2, 3).set(queue=NODE_QUEUE), sig("py.add", 2, 2)]
    async with Client(address) as client:
        submitted = await client.submit(chord(members, sig("py.collect")))
        assert (await client.result(submitted.task_id, wait=30))["results"] == [2, 6, 4]
    *member_ids, callback_id = submitted.task_ids
    spans = trace_of(receiver[0], {
        ("dispatch py.collect", callback_id), ("execute py.collect", callback_id),
        *((f"result {s.name}", task_id) for s, task_id in zip(members, member_ids, strict=True)),
    })

    member_results = {only(spans, f"result {s.name}", task_id).span.span_id
                      for s, task_id in zip(members, member_ids, strict=True)}
    assert len(member_results) == 3
    for name in ("dispatch py.collect", "execute py.collect"):
        callback = only(spans, name, callback_id)
        linked = {link.span_id for link in callback.span.links}
        assert linked == member_results, f"{name} links to {len(linked)} of the 3 members"
        assert {link.trace_id for link in callback.span.links} == {callback.span.trace_id}
