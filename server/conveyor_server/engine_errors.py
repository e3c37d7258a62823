"""Which engine failures are transient: the broker or backend could not be reached, or could
not answer for a moment, so the same call may well succeed when retried. The API layer reports
them as UNAVAILABLE with a retry hint (see api/status.py); anything else is a bug or a refusal.

Transient, per engine client:
- redis-py: ConnectionError (BusyLoadingError, MaxConnectionsError...), TimeoutError, and the
  replies of a server that is failing over (READONLY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN).
  Not its AuthenticationError / AuthorizationError: a wrong password stays wrong.
- aio-pika / aiormq: AMQPConnectionError (ConnectionClosed...), ChannelInvalidStateError and a
  closed channel. Not an authentication, protocol-version, vhost or access refusal, nor a
  PRECONDITION_FAILED (a queue declared with other arguments).
- aiobotocore / botocore: EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError,
  ReadTimeoutError (not an SSLError), aiohttp's connection errors, and a ClientError for a
  queue that does not exist (yet, or any more), throttling or a 5xx.
- pymongo: ConnectionFailure (AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError,
  NotPrimaryError...), errors labelled RetryableWriteError / TransientTransactionError and
  the codes of a node shutting down or stepping down.
- aiomcache: a ClientException for a reply cut short (the server closed the connection) or a
  SERVER_ERROR reply; not a ValidationException.
- sqlite3: OperationalError for a busy or locked database.
- Python: ConnectionError, TimeoutError (asyncio's too), asyncio.IncompleteReadError and
  OSError with a network errno (a temporary DNS failure included).

The engines' libraries are optional extras, and an exception can only come from a library that
was imported: each is looked up in sys.modules, never imported here. An exception that wraps a
transient one (`raise X from exc`) is transient; an exception group is when all its members are.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Callable
from typing import Any

MAX_CAUSES = 8

NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EHOSTUNREACH, errno.EHOSTDOWN,
    errno.ENOTCONN, errno.ESHUTDOWN, errno.EADDRNOTAVAIL, errno.EAGAIN,
})

# ClientError codes (and exception class names) of SQS and AWS in general worth a retry.
AWS_TRANSIENT_CODES = frozenset({
    "QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "AWS.SimpleQueueService.QueueDoesNotExist",
    # A queue deleted in the last 60 s cannot be created again yet (the SQS broker re-creates lost queues).
    "QueueDeletedRecently", "AWS.SimpleQueueService.QueueDeletedRecently",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "SlowDown", "ServiceUnavailable", "InternalError",
    "InternalFailure", "RequestTimeout", "RequestTimeoutException", "KMS.ThrottlingException",
})

# MongoDB server error codes of a node that is going away or not primary any more.
MONGO_TRANSIENT_CODES = frozenset({
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
})
MONGO_TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError")

# One verdict per library: True (transient), False (definitely not), None (not this library's).
Verdict = bool | None


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what it was raised from) means an engine was out of reach for now."""
    return transient_cause(exc) is not None


def transient_cause(exc: BaseException) -> BaseException | None:
    """The transient failure in `exc` or its explicit causes, or None when there is none."""
    current: BaseException | None = exc
    for _ in range(MAX_CAUSES):
        if current is None:
            return None
        if isinstance(current, BaseExceptionGroup):
            members = [transient_cause(member) for member in current.exceptions]
            if members and all(member is not None for member in members):
                return members[0]
        else:
            verdict = _verdict(current)
            if verdict is not None:
                return current if verdict else None
        current = current.__cause__
    return None


def _verdict(exc: BaseException) -> Verdict:
    for classify in _LIBRARIES:
        verdict = classify(exc)
        if verdict is not None:
            return verdict
    return _builtin(exc)


def _module(name: str) -> Any:
    """The library's module when the process imported it (or None)."""
    return sys.modules.get(name)


def _classes(module: Any, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes `names` that this version of the library defines."""
    found = (getattr(module, name, None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


def _redis(exc: BaseException) -> Verdict:
    module = _module("redis.exceptions")
    if module is None or not isinstance(exc, _classes(module, "RedisError")):
        return None
    if isinstance(exc, _classes(module, "AuthenticationError", "AuthorizationError", "ExternalAuthProviderError")):
        return False
    return isinstance(exc, _classes(
        module, "ConnectionError", "TimeoutError", "ReadOnlyError", "TryAgainError", "ClusterDownError",
    ))


def _amqp(exc: BaseException) -> Verdict:
    module = _module("aiormq.exceptions")
    if module is None or not isinstance(exc, _classes(module, "AMQPError", "ChannelInvalidStateError")):
        return None
    if isinstance(exc, _classes(
        module, "AuthenticationError", "ProbableAuthenticationError", "IncompatibleProtocolError",
        "ConnectionNotAllowed", "ChannelAccessRefused", "ChannelPreconditionFailed", "DuplicateConsumerTag",
    )):
        return False
    return isinstance(exc, _classes(module, "AMQPConnectionError", "ChannelInvalidStateError", "ChannelClosed"))


def _botocore(exc: BaseException) -> Verdict:
    module = _module("botocore.exceptions")
    if module is None:
        return None
    if isinstance(exc, _classes(module, "SSLError")):
        return False
    if isinstance(exc, _classes(module, "ConnectionError", "HTTPClientError")):
        return True
    if isinstance(exc, _classes(module, "ClientError")):
        response: Any = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in AWS_TRANSIENT_CODES or type(exc).__name__ in AWS_TRANSIENT_CODES or status >= 500
    if isinstance(exc, _classes(module, "BotoCoreError")):
        return False
    return None


def _aiohttp(exc: BaseException) -> Verdict:
    module = _module("aiohttp.client_exceptions")
    if module is None or not isinstance(exc, _classes(module, "ClientError")):
        return None
    if isinstance(exc, _classes(module, "ClientSSLError")):
        return False
    return isinstance(exc, _classes(module, "ClientConnectionError", "ServerTimeoutError"))


def _pymongo(exc: BaseException) -> Verdict:
    module = _module("pymongo.errors")
    if module is None or not isinstance(exc, _classes(module, "PyMongoError")):
        return None
    if isinstance(exc, _classes(module, "ConnectionFailure")):
        return True
    has_label: Callable[[str], bool] | None = getattr(exc, "has_error_label", None)
    if has_label is not None and any(has_label(label) for label in MONGO_TRANSIENT_LABELS):
        return True
    return getattr(exc, "code", None) in MONGO_TRANSIENT_CODES


def _memcached(exc: BaseException) -> Verdict:
    module = _module("aiomcache.exceptions")
    if module is None or not isinstance(exc, _classes(module, "ClientException")):
        return None
    if isinstance(exc, _classes(module, "ValidationException")):
        return False
    message = str(exc)
    # aiomcache formats the reply into the message: b'' is a connection the server closed.
    return message.endswith(": b''") or "SERVER_ERROR" in message


def _sqlite(exc: BaseException) -> Verdict:
    module = _module("sqlite3")
    if module is None or not isinstance(exc, _classes(module, "Error")):
        return None
    if not isinstance(exc, _classes(module, "OperationalError")):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED (and extended codes)
        return True
    message = str(exc).lower()
    return "is locked" in message or "database is busy" in message


def _builtin(exc: BaseException) -> Verdict:
    """Python's own network errors; None for the rest, so that what it was raised from counts."""
    if isinstance(exc, ConnectionError | TimeoutError | asyncio.IncompleteReadError):
        return True
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN or None
    return True if isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS else None


_LIBRARIES: tuple[Callable[[BaseException], Verdict], ...] = (
    _redis, _amqp, _botocore, _aiohttp, _pymongo, _memcached, _sqlite,
)
