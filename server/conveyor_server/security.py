"""Transport security: TLS/mTLS credentials and the refusal to expose an unauthenticated server."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from .config import ConfigError, Settings

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Listening beyond this machine without tokens is refused unless explicitly allowed."""
    security = settings.security
    if is_loopback(settings.host) or security.tokens or security.allow_public_without_auth:
        return
    raise ConfigError(
        f"refusing to listen on {settings.host} without authentication: configure security.tokens, "
        "or set security.allow_public_without_auth: true if something else protects this port"
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mTLS (client certificates required) with a client CA."""
    security = settings.security
    if not security.tls_cert_file and not security.tls_key_file:
        if security.tls_client_ca_file:
            raise ConfigError("security.tls_client_ca_file needs tls_cert_file and tls_key_file too")
        return None
    if not (security.tls_cert_file and security.tls_key_file):
        raise ConfigError("TLS needs both security.tls_cert_file and security.tls_key_file")
    key = _read(security.tls_key_file, "TLS key")
    chain = _read(security.tls_cert_file, "TLS certificate")
    client_ca = _read(security.tls_client_ca_file, "client CA") if security.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
