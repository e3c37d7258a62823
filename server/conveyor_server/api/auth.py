"""Bearer-token authentication and per-role authorization for every RPC.

Roles: `client` may use TaskService, `worker` may use WorkerService (only on the queues its
token names), `viewer` may call the read-only methods (VIEWER_METHODS: what the dashboard shows),
`admin` may use everything. Health and reflection stay open so load balancers
and grpcurl can probe. Tokens are configured as SHA-256 digests; secrets are never stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from ..config import Token
from .status import Refusal
from .status import refuse as refuse_call

OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
ROLE_FOR_SERVICE = {
    "conveyor.v1.TaskService": "client",
    "conveyor.v1.WorkerService": "worker",
    "conveyor.v1.AdminService": "admin",
}
# What a `viewer` token may call: reads, never a change.
VIEWER_METHODS = frozenset(
    [f"/conveyor.v1.AdminService/{name}" for name in (
        "ListQueues", "ListWorkers", "InspectTask", "ListDeadLetters", "ListSchedules", "ListRegisteredTasks",
        "ListRateLimits", "ListTasks",
    )]
    + [f"/conveyor.v1.TaskService/{name}" for name in ("GetResult", "WatchResults", "GetWorkflow")]
)
Metadata = Iterable[tuple[str, str | bytes]] | None
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    queues: tuple[str, ...] = ()

    def may_serve(self, queues: Sequence[str]) -> bool:
        return self.role == "admin" or not self.queues or set(queues) <= set(self.queues)


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Authenticator:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self._by_digest = {t.sha256: Identity(t.name, t.role, t.queues) for t in tokens}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def identify(self, metadata: Metadata) -> Identity | None:
        """The caller's identity; None when auth is off. Raises AuthError for a bad token."""
        if not self.enabled:
            return None
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send 'authorization: Bearer <token>'"
            )
        text = header.decode() if isinstance(header, bytes) else header
        scheme, _, secret = text.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "the authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(secret.strip().encode()).hexdigest()
        for known, identity in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return identity
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")

    def authorize(self, method: str, metadata: Metadata) -> Identity | None:
        """Check that the caller may call `method` (/package.Service/Method)."""
        service = method.split("/")[1] if method.count("/") >= 2 else method
        if service in OPEN_SERVICES or not self.enabled:
            return None
        identity = self.identify(metadata)
        assert identity is not None
        needed = ROLE_FOR_SERVICE.get(service, "admin")
        if identity.role == "viewer":
            if method in VIEWER_METHODS:
                return identity
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {identity.name!r} has role 'viewer', which may only read; {method} needs role "
                f"{needed!r} or 'admin'",
            )
        if identity.role not in (needed, "admin"):
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {identity.name!r} has role {identity.role!r}; {method} needs role {needed!r} or 'admin'",
            )
        return identity


def _refusal(handler: Handler, error: AuthError) -> Handler:
    """A handler of the same shape as `handler` that only refuses."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse_call(context, Refusal(error.code, str(error), error.code.name))

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        try:
            self.authenticator.authorize(handler_call_details.method, handler_call_details.invocation_metadata)
        except AuthError as error:
            return _refusal(handler, error)
        return handler
