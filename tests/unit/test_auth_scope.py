"""Worker tokens are scoped to their queues: a worker may serve a subset of its token's queues,
never a queue outside them. Checked on the authorizer itself and on WorkerService.Connect's
refusal, without a server (a stand-in servicer context)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, NoReturn, cast

import grpc
import pytest

from conveyor.v1 import worker_service_pb2
from conveyor_server.api.auth import Authenticator, AuthError, Identity
from conveyor_server.api.worker_service import WorkerServicer
from conveyor_server.app import Core
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings, Token

SECRET = "s3cret-worker"


def worker_token(queues: tuple[str, ...]) -> Token:
    return Token("payroll-worker", "worker", hashlib.sha256(SECRET.encode()).hexdigest(), queues)


def bearer(secret: str = SECRET) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def identity_of(token: Token) -> Identity:
    identity = Authenticator([token]).identify(bearer())
    assert identity is not None
    return identity


@pytest.mark.parametrize(
    ("asked", "allowed"),
    [
        (["a"], True),
        (["a", "b"], False),  # overlaps {a} but is not inside it
        (["b"], False),
        (["a", "a"], True),
    ],
)
def test_a_worker_token_limited_to_queue_a_serves_only_subsets_of_a(asked: list[str], allowed: bool) -> None:
    assert identity_of(worker_token(("a",))).may_serve(asked) is allowed


def test_a_token_limited_to_two_queues_serves_either_or_both_but_no_third() -> None:
    identity = identity_of(worker_token(("a", "b")))
    assert identity.may_serve(["b"]) and identity.may_serve(["a", "b"])
    assert not identity.may_serve(["a", "c"])


def test_an_unscoped_worker_token_and_an_admin_token_serve_any_queue() -> None:
    assert identity_of(worker_token(())).may_serve(["a", "b"])
    assert Identity("root", "admin", ("a",)).may_serve(["a", "b"])


def test_a_worker_token_may_connect_but_not_submit() -> None:
    authenticator = Authenticator([worker_token(("a",))])
    assert authenticator.authorize("/conveyor.v1.WorkerService/Connect", bearer()) is not None
    with pytest.raises(AuthError) as refused:
        authenticator.authorize("/conveyor.v1.TaskService/Submit", bearer())
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(AuthError) as unknown:
        authenticator.authorize("/conveyor.v1.WorkerService/Connect", bearer("guess"))
    assert unknown.value.code == grpc.StatusCode.UNAUTHENTICATED


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class StandInContext:
    """The two things Connect asks of its servicer context before the stream runs."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> NoReturn:
        raise Aborted(code, details)


async def hello(queues: list[str]) -> AsyncIterator[worker_service_pb2.ConnectRequest]:
    yield worker_service_pb2.ConnectRequest(
        hello=worker_service_pb2.Hello(worker_id="w1", queues=queues, max_in_flight=1)
    )


async def test_connect_refuses_a_hello_for_queues_a_and_b_with_a_token_for_queue_a() -> None:
    settings = Settings(broker_url="memory://", backend_url="memory://")
    core = Core.build(settings, MemoryBroker(), MemoryBackend())
    servicer = WorkerServicer(core.connections, Authenticator([worker_token(("a",))]))
    stream = servicer.Connect(hello(["a", "b"]), cast(Any, StandInContext(bearer())))
    with pytest.raises(Aborted) as refused:
        await anext(stream)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'payroll-worker' may serve queues ['a']" in str(refused.value)
    assert not core.registry.sessions, "no session was opened"


async def test_a_session_keeps_its_tokens_queues_for_the_replacements_its_worker_asks_for() -> None:
    """A worker may replace a task only with tasks for its token's queues (core/replacement.py)."""
    settings = Settings(broker_url="memory://", backend_url="memory://")
    core = Core.build(settings, MemoryBroker(), MemoryBackend())
    servicer = WorkerServicer(core.connections, Authenticator([worker_token(("a", "b"))]))
    stream = cast(AsyncGenerator[worker_service_pb2.ConnectResponse, None],
                  servicer.Connect(hello(["a"]), cast(Any, StandInContext(bearer()))))
    welcome = await anext(stream)
    assert welcome.WhichOneof("message") == "welcome"
    [session] = list(core.registry.sessions.values())
    assert session.allowed_queues == ("a", "b")
    await stream.aclose()
