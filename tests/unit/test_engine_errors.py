"""engine_errors.is_transient tells an engine out of reach (retry later) from everything else,
with the real exception classes of every engine client, and real failures where they are cheap
to provoke; api/status.py reports what it recognises as UNAVAILABLE with a retry hint."""

from __future__ import annotations

import asyncio
import errno
import importlib
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aio_pika
import aioboto3
import aiomcache
import aiormq.exceptions as amqp
import grpc
import pymongo
import pymongo.errors as mongo
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rd
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conveyor_server.api.status import RETRY_AFTER_KEY, STATUS_DETAILS_KEY, refusal
from conveyor_server.core import errors
from conveyor_server.engine_errors import is_transient, transient_cause
from tests.support.processes import REPO

# botocore has no type stubs; its classes are looked up as the SQS broker does.
boto: Any = importlib.import_module("botocore.exceptions")
botocore_config: Any = importlib.import_module("botocore.config")
botocore_session: Any = importlib.import_module("botocore.session")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listening, so nobody else takes it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def hang_up_port() -> AsyncIterator[int]:
    """A loopback port whose server accepts each connection and closes it at once."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# -- redis-py --------------------------------------------------------------------------------

async def test_a_refused_redis_connection_is_transient(closed_port: int) -> None:
    client = aioredis.Redis(port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(rd.ConnectionError) as raised:
            await client.ping()
    finally:
        await client.aclose()
    assert is_transient(raised.value)


@pytest.mark.parametrize("exc", [
    rd.ConnectionError("Connection reset by peer"),
    rd.BusyLoadingError("Redis is loading the dataset in memory"),
    rd.TimeoutError("Timeout reading from socket"),
    rd.MaxConnectionsError("Too many connections"),
    rd.ReadOnlyError("You can't write against a read only replica."),
    rd.TryAgainError("TRYAGAIN"),
    rd.ClusterDownError("CLUSTERDOWN The cluster is down"),
])
def test_redis_connection_failures_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    rd.AuthenticationError("invalid username-password pair"),
    rd.AuthorizationError("NOPERM"),
    rd.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rd.NoScriptError("NOSCRIPT"),
    rd.DataError("Invalid input of type: 'dict'"),
    rd.WatchError("Watched variable changed."),
])
def test_redis_refusals_and_bad_credentials_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


# -- aio-pika / aiormq -----------------------------------------------------------------------

async def test_a_refused_amqp_connection_is_transient(closed_port: int) -> None:
    with pytest.raises(amqp.AMQPConnectionError) as raised:
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{closed_port}/", timeout=2)
    assert is_transient(raised.value)


@pytest.mark.parametrize("exc", [
    amqp.AMQPConnectionError("connection lost"),
    amqp.ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure"),
    amqp.ConnectionInternalError(541, "INTERNAL_ERROR"),
    amqp.ChannelInvalidStateError("No active transport in channel"),
    amqp.ChannelClosed(None, None),
    amqp.ChannelNotFoundEntity("NOT_FOUND - no queue 'q'"),
    aio_pika.exceptions.ChannelInvalidStateError("channel closed"),
])
def test_amqp_connection_and_channel_losses_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    amqp.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"),
    amqp.AuthenticationError("PLAIN not supported"),
    amqp.IncompatibleProtocolError("AMQP 1.0"),
    amqp.ConnectionNotAllowed(530, "NOT_ALLOWED - vhost not found"),
    amqp.ChannelAccessRefused("ACCESS_REFUSED"),
    amqp.ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'x-max-priority'"),
    amqp.DuplicateConsumerTag("tag"),
])
def test_amqp_refusals_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


# -- aiobotocore / botocore (SQS) ------------------------------------------------------------

async def test_an_unreachable_sqs_endpoint_is_transient(closed_port: int) -> None:
    # One attempt, no retry: botocore's legacy "max_attempts" counts retries, and its one retry
    # waited a random backoff of up to a second.
    config = botocore_config.Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=2)
    async with aioboto3.Session().client(
        "sqs", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{closed_port}",
        aws_access_key_id="test", aws_secret_access_key="test", config=config,
    ) as sqs:
        with pytest.raises(boto.EndpointConnectionError) as raised:
            await sqs.list_queues()
    assert is_transient(raised.value)


def _client_error(code: str, status: int = 400) -> BaseException:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    error: BaseException = boto.ClientError(response, "ReceiveMessage")
    return error


def test_a_missing_sqs_queue_is_transient() -> None:
    sqs = botocore_session.get_session().create_client(
        "sqs", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    queue_gone = sqs.exceptions.QueueDoesNotExist
    exc = queue_gone({"Error": {"Code": "QueueDoesNotExist", "Message": "gone"}}, "GetQueueUrl")
    assert is_transient(exc)
    assert is_transient(_client_error("AWS.SimpleQueueService.NonExistentQueue"))


@pytest.mark.parametrize("exc", [
    boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:4566"),
    boto.ConnectTimeoutError(endpoint_url="http://127.0.0.1:4566"),
    boto.ConnectionClosedError(endpoint_url="http://127.0.0.1:4566"),
    boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:4566"),
    _client_error("ThrottlingException"),
    _client_error("InternalError", 500),
    _client_error("Whatever", 503),
])
def test_sqs_connection_failures_throttling_and_5xx_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    _client_error("AccessDenied", 403),
    _client_error("AWS.SimpleQueueService.BatchEntryIdsNotDistinct"),
    boto.NoCredentialsError(),
    boto.SSLError(endpoint_url="https://sqs", error="certificate verify failed"),
    boto.ParamValidationError(report="bad"),
])
def test_sqs_refusals_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


# -- pymongo ---------------------------------------------------------------------------------

def test_an_unreachable_mongodb_is_transient(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Server selection looks again every MIN_HEARTBEAT_INTERVAL (0.5 s), whatever its timeout:
    # a shorter interval lets the selection give up after its 50 ms.
    monkeypatch.setattr(pymongo.common, "MIN_HEARTBEAT_INTERVAL", 0.01)
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{closed_port}", serverSelectionTimeoutMS=50, connectTimeoutMS=300
    )
    try:
        with pytest.raises(mongo.ServerSelectionTimeoutError) as raised:
            client.admin.command("ping")
    finally:
        client.close()
    assert is_transient(raised.value)


def _labelled(label: str) -> mongo.OperationFailure:
    return mongo.OperationFailure("write failed", 112, {"errorLabels": [label], "code": 112})


@pytest.mark.parametrize("exc", [
    mongo.AutoReconnect("connection closed"),
    mongo.NetworkTimeout("timed out"),
    mongo.NotPrimaryError("not primary"),
    mongo.WaitQueueTimeoutError("pool exhausted"),
    mongo.OperationFailure("interrupted at shutdown", 11600),
    _labelled("RetryableWriteError"),
    _labelled("TransientTransactionError"),
])
def test_mongodb_connection_failures_and_retryable_errors_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    mongo.DuplicateKeyError("E11000 duplicate key", 11000),
    mongo.OperationFailure("bad query", 2),
    mongo.ConfigurationError("bad URI option"),
    mongo.InvalidOperation("cursor closed"),
])
def test_mongodb_refusals_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


# -- aiomcache -------------------------------------------------------------------------------

async def test_a_memcached_connection_closed_mid_call_is_transient(hang_up_port: int) -> None:
    client = aiomcache.Client("127.0.0.1", hang_up_port)
    try:
        with pytest.raises(Exception) as raised:  # which one depends on timing
            await client.get(b"key")
    finally:
        await client.close()
    assert is_transient(raised.value), repr(raised.value)


async def test_a_refused_memcached_connection_is_transient(closed_port: int) -> None:
    client = aiomcache.Client("127.0.0.1", closed_port)
    try:
        with pytest.raises(OSError) as raised:
            await client.get(b"key")
    finally:
        await client.close()
    assert is_transient(raised.value)


def test_memcached_server_errors_are_transient_and_refusals_are_not() -> None:
    assert is_transient(aiomcache.ClientException("get failed", b""))
    assert is_transient(aiomcache.ClientException("Memcached set failed", b"SERVER_ERROR out of memory"))
    assert not is_transient(aiomcache.ValidationException("invalid key", b"a key"))
    assert not is_transient(aiomcache.ClientException("Memcached incr failed", b"CLIENT_ERROR non-numeric value"))


# -- sqlite3 ---------------------------------------------------------------------------------

def test_a_locked_sqlite_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.OperationalError, match="locked") as raised:
            waiter.execute("INSERT INTO t VALUES (2)")
        assert is_transient(raised.value)
        with pytest.raises(sqlite3.OperationalError, match="no such table") as missing:
            waiter.execute("SELECT * FROM nowhere")
        assert not is_transient(missing.value)
        with pytest.raises(sqlite3.IntegrityError) as integrity:
            holder.execute("CREATE TABLE u (x UNIQUE)")
            holder.execute("INSERT INTO u VALUES (1), (1)")
        assert not is_transient(integrity.value)
    finally:
        holder.close()
        waiter.close()


# -- Python's own ----------------------------------------------------------------------------

async def test_a_refused_socket_and_a_timeout_are_transient(closed_port: int) -> None:
    with pytest.raises(ConnectionRefusedError) as refused:
        await asyncio.open_connection("127.0.0.1", closed_port)
    assert is_transient(refused.value)
    with pytest.raises(asyncio.TimeoutError) as timed_out:
        await asyncio.wait_for(asyncio.sleep(10), 0.01)
    assert is_transient(timed_out.value)


@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    TimeoutError("timed out"),
    OSError(errno.ENETUNREACH, "Network is unreachable"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    asyncio.IncompleteReadError(b"partial", 10),
])
def test_network_errors_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
    PermissionError(errno.EACCES, "Permission denied"),
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    ValueError("bad"),
    RuntimeError("bug"),
    KeyError("missing"),
    asyncio.CancelledError(),
    errors.InvalidArgument("bad request"),
])
def test_other_errors_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_wrapped_transient_error_is_transient_and_the_cause_is_named() -> None:
    cause = rd.ConnectionError("Connection reset by peer")
    try:
        try:
            raise cause
        except rd.ConnectionError as exc:
            raise RuntimeError("publishing failed") from exc
    except RuntimeError as wrapped:
        assert transient_cause(wrapped) is cause
    implicit = RuntimeError("bug while handling")
    implicit.__context__ = cause  # only an explicit `from` counts
    assert not is_transient(implicit)


def test_an_exception_group_is_transient_only_when_all_its_members_are() -> None:
    assert is_transient(ExceptionGroup("all lost", [ConnectionResetError(), rd.TimeoutError()]))
    assert not is_transient(ExceptionGroup("mixed", [ConnectionResetError(), ValueError()]))


def test_is_transient_imports_no_engine_library() -> None:
    script = (
        "import sys; from conveyor_server.engine_errors import is_transient;"
        "assert not is_transient(ValueError()) and is_transient(ConnectionResetError());"
        "loaded = [m for m in ('redis', 'aiormq', 'botocore', 'pymongo', 'aiomcache', 'aiohttp') if m in sys.modules];"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)


# -- how the API reports them ----------------------------------------------------------------

def _retry_delay(metadata: tuple[tuple[str, str | bytes], ...]) -> float:
    details = dict(metadata)[STATUS_DETAILS_KEY]
    assert isinstance(details, bytes)
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert [detail.Unpack(info) for detail in status.details if detail.Is(info.DESCRIPTOR)] == [True]
    return float(info.retry_delay.ToMilliseconds()) / 1000


def test_a_transient_engine_error_is_reported_unavailable_with_a_retry_hint() -> None:
    reported = refusal(rd.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."))
    assert reported is not None
    assert reported.code == grpc.StatusCode.UNAVAILABLE
    assert reported.message == (
        "the broker/backend is unreachable: redis.exceptions.ConnectionError: "
        "Error 111 connecting to 127.0.0.1:6379. Connection refused.; retry"
    )
    assert dict(reported.trailing_metadata)[RETRY_AFTER_KEY] == "1000"
    assert _retry_delay(reported.trailing_metadata) == 1.0


def test_unavailable_from_the_core_is_reported_unavailable_and_a_bug_is_not_recognised() -> None:
    reported = refusal(errors.Unavailable("the backend did not answer"))
    assert reported is not None
    assert reported.code == grpc.StatusCode.UNAVAILABLE
    assert _retry_delay(reported.trailing_metadata) == 1.0
    refused = refusal(errors.NotFound("no task"))
    assert refused is not None
    assert (refused.code, refused.retry_after_ms) == (grpc.StatusCode.NOT_FOUND, 0)
    assert RETRY_AFTER_KEY not in dict(refused.trailing_metadata)
    assert refusal(RuntimeError("bug")) is None
