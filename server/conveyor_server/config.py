"""Server settings: defaults, overridden by a YAML file, then by CONVEYOR_* environment variables,
then by command-line flags (applied by the CLI)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "CONVEYOR_"


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong kind."""


@dataclass(frozen=True)
class Limits:
    # Largest gRPC message either way.
    max_message_bytes: int = 16 * 1024 * 1024
    # Encoded args + kwargs of one signature.
    max_args_bytes: int = 1024 * 1024
    # Tasks in one submission (a workflow or a batch).
    max_workflow_tasks: int = 10_000
    # Nesting of chains, groups and chords.
    max_workflow_depth: int = 32


ROLES = ("client", "worker", "admin")


@dataclass(frozen=True)
class Token:
    """A bearer token, stored as the SHA-256 hex digest of the secret (never the secret)."""

    name: str
    role: str
    sha256: str
    # For worker tokens: the only queues it may pull from (empty: any).
    queues: tuple[str, ...] = ()


@dataclass(frozen=True)
class Security:
    # No tokens: every caller may do everything (fine on loopback, refused on a public address).
    tokens: tuple[Token, ...] = ()
    # TLS: server certificate chain and key (PEM files). A client CA turns on mTLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Listen on a non-loopback address without tokens only when this says so.
    allow_public_without_auth: bool = False
    # Tasks per second each token (or each peer, without auth) may submit; 0 is unlimited.
    submit_rate_per_second: float = 0.0
    submit_burst: int = 1000


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    broker_url: str = "sqlite:///conveyor.db"
    backend_url: str = "sqlite:///conveyor.db"
    # How long results are kept after their task (or its workflow) ends.
    result_ttl_seconds: float = 86_400.0
    # A lease lasts this long unless the worker's heartbeats extend it.
    lease_seconds: float = 30.0
    heartbeat_interval_seconds: float = 5.0
    # After a worker's stream drops, its tasks go back to the queue after this grace.
    stream_grace_seconds: float = 2.0
    # Most tasks per Assignments message.
    assignment_batch: int = 100
    # How often leases whose holder vanished are recovered.
    recover_interval_seconds: float = 1.0
    # Work promised in the outbox (publishes, follow-ups) and not confirmed within this grace
    # is done by the reconciler, which looks every reconcile_interval_seconds.
    outbox_grace_seconds: float = 10.0
    reconcile_interval_seconds: float = 2.0
    # How often each replica looks for due periodic schedules (and how soon a tick fires).
    schedule_tick_seconds: float = 1.0
    default_queue: str = "default"
    server_id: str = ""
    log_level: str = "INFO"
    log_json: bool = False
    # OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (empty: OTEL_EXPORTER_OTLP_ENDPOINT or none).
    otlp_endpoint: str = ""
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    # Prometheus metrics on http://metrics_host:metrics_port/metrics (0: off).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _tokens(name: str, raw: Any) -> tuple[Token, ...]:
    """Tokens come as a list of mappings (YAML) or as that list in JSON (environment)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting {name!r} must be a JSON list of tokens: {exc}") from exc
    if not isinstance(raw, list):
        raise ConfigError(f"setting {name!r} must be a list of tokens")
    tokens = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not {"name", "role", "sha256"} <= set(item):
            raise ConfigError(f"{name}[{i}] needs name, role and sha256 (and, for workers, optional queues)")
        if item["role"] not in ROLES:
            raise ConfigError(f"{name}[{i}]: role {item['role']!r} is not one of {', '.join(ROLES)}")
        digest = str(item["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{name}[{i}]: sha256 must be 64 hex digits (sha256sum of the secret)")
        unknown = set(item) - {"name", "role", "sha256", "queues"}
        if unknown:
            raise ConfigError(f"{name}[{i}]: unknown keys {sorted(unknown)}")
        tokens.append(Token(str(item["name"]), item["role"], digest, tuple(item.get("queues") or ())))
    return tuple(tokens)


def _coerce(name: str, current: Any, raw: Any) -> Any:
    if name == "tokens":
        return _tokens(name, raw)
    kind = type(current)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r} expects {kind.__name__}, got {raw!r}") from exc


def _apply(target: Any, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(target)}
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown setting {key!r} in {where}; known: {', '.join(sorted(known))}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"setting {key!r} in {where} must be a mapping")
            changes[name] = _apply(current, raw, f"{where}.{key}")
        else:
            changes[name] = _coerce(name, current, raw)
    return dataclasses.replace(target, **changes)


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the YAML file (if any), then CONVEYOR_* variables.

    Nested limits are set as CONVEYOR_LIMITS__MAX_ARGS_BYTES (double underscore). Unknown keys in
    the file are an error; CONVEYOR_* variables that name no setting are left alone.
    """
    settings = Settings()
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        settings = _apply(settings, loaded, str(path))
    env = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings)}
    flat: dict[str, Any] = {}
    for key, raw in env.items():
        parts = key[len(ENV_PREFIX):].lower().split("__")
        # Other CONVEYOR_* variables (the client's CONVEYOR_ADDRESS, say) are not server settings.
        if not key.startswith(ENV_PREFIX) or parts[0] not in known:
            continue
        node = flat
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = raw
    if flat:
        settings = _apply(settings, flat, "the environment")
    return settings
