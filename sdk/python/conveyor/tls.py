"""Channel credentials for TLS and mTLS, from PEM files."""

from __future__ import annotations

import os
from pathlib import Path

import grpc


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca_file` (default: the system roots); with cert and key, mTLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("mTLS needs both a client certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def credentials_from_env() -> grpc.ChannelCredentials | None:
    """TLS from CONVEYOR_TLS_CA / CONVEYOR_TLS_CERT / CONVEYOR_TLS_KEY, when any is set."""
    ca, cert, key = (os.environ.get(f"CONVEYOR_TLS_{name}") for name in ("CA", "CERT", "KEY"))
    if not (ca or cert or key):
        return None
    return channel_credentials(ca, cert, key)


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, options: list[tuple[str, object]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel: TLS with `credentials` (or CONVEYOR_TLS_* variables), else plaintext."""
    credentials = credentials or credentials_from_env()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The authorization metadata for `token` (or CONVEYOR_TOKEN); empty without one."""
    token = token or os.environ.get("CONVEYOR_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()
