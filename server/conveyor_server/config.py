"""Server settings: defaults, overridden by a YAML file, then by CONVEYOR_* environment variables,
then by command-line flags (applied by the CLI)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

ENV_PREFIX = "CONVEYOR_"
# The embedded default broker and backend: one SQLite file, in data_dir when that is set.
SQLITE_FILE = "conveyor.db"
DEFAULT_SQLITE_URL = f"sqlite:///{SQLITE_FILE}"


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
    # Tasks in one streamed submission (SubmitStream: a group sent in pieces), which the
    # receiving server holds in memory until its commit.
    max_stream_tasks: int = 200_000
    # A SubmitStream that sends nothing for this long is ended (and nothing of it is submitted).
    stream_idle_seconds: float = 60.0


@dataclass(frozen=True)
class QueueLimit:
    """Admission control of one queue (core/admission.py)."""

    # Most ready tasks the queue holds before submit answers RESOURCE_EXHAUSTED (0: no limit).
    max_depth: int = 0
    # Longest a task may have waited in the queue, ready to run, before submit answers
    # RESOURCE_EXHAUSTED (0: no limit).
    max_age_seconds: float = 0.0


ROLES = ("client", "worker", "admin", "viewer")


@dataclass(frozen=True)
class Token:
    """A bearer token, stored as the SHA-256 hex digest of the secret (never the secret)."""

    name: str
    role: str
    sha256: str
    # The only queues the token may use (empty: any): a worker pulls only from these, a client
    # submits to, reads and cancels only tasks of these.
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
    broker_url: str = DEFAULT_SQLITE_URL
    backend_url: str = DEFAULT_SQLITE_URL
    # Where the embedded SQLite default (a broker_url or backend_url left as it is) keeps its
    # file, conveyor.db; created if missing. Empty: the directory the server starts in.
    data_dir: str = ""
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
    # A live task with no sign of life for this long (queued past its ETA, due to retry, or
    # running with no lease renewal) has lost its broker message and is republished by the
    # reconciler. 0: four lease lengths. Must exceed two heartbeat intervals.
    repair_after_seconds: float = 0.0
    # Deliveries of one attempt that may end without an outcome (the worker or its server lost
    # mid-run) before the task fails for good with WorkerLost: a task that kills its workers
    # cannot loop forever.
    max_deliveries: int = 3
    # How often each replica looks for due periodic schedules (and how soon a tick fires).
    schedule_tick_seconds: float = 1.0
    # Check every submit as SubmitRequest.strict does: refuse task names no worker registered and
    # args that do not match the task's declared schema (core/task_schemas.py).
    strict_tasks: bool = False
    # A task name whose workers have all left stays in the task registry (known to strict
    # submits, listed by `conveyor tasks`) this long after its last worker was seen.
    task_registry_retention_seconds: float = 86_400.0
    default_queue: str = "default"
    server_id: str = ""
    log_level: str = "INFO"
    log_json: bool = False
    # OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (empty: OTEL_EXPORTER_OTLP_ENDPOINT or none).
    otlp_endpoint: str = ""
    limits: Limits = field(default_factory=Limits)
    # Per queue admission limits, e.g. {"emails": QueueLimit(max_depth=100_000)}.
    queue_limits: Mapping[str, QueueLimit] = field(default_factory=dict)
    # Rate limits by task name, applied at dispatch: name -> "100/s" (or "10/m", "1000/h"), or
    # name -> {rate, burst, per_key}. Limits stored through AdminService win for their names.
    rate_limits: Mapping[str, Any] = field(default_factory=dict)
    security: Security = field(default_factory=Security)
    # Prometheus metrics on http://metrics_host:metrics_port/metrics (0: off).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # The dashboard and HTTP/JSON API (docs/dashboard.md) on http://http_host:http_port; 0 turns
    # it off. A public host needs tokens, as for gRPC. While the default port 8080 is taken (a
    # second server on this machine) the server runs without it and says so; any other port
    # must be free.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # A task's trace id links here, "{trace_id}" replaced: e.g. http://localhost:16686/trace/{trace_id}
    # (Jaeger). Empty: the trace id is shown as text.
    http_trace_url: str = ""
    # Keep the task index that ListTasks and the dashboard's task list read (false: no listing,
    # and none of its writes).
    task_index: bool = True

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def with_data_dir(settings: Settings) -> Settings:
    """The settings with the embedded SQLite default moved into data_dir (a URL set to anything
    else is left alone), the directory created."""
    if not settings.data_dir:
        return settings
    directory = Path(settings.data_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use the data directory {directory}: {exc.strerror or exc}") from None
    url = f"sqlite:///{quote(str(directory.absolute() / SQLITE_FILE))}"
    return settings.replace(
        broker_url=url if settings.broker_url == DEFAULT_SQLITE_URL else settings.broker_url,
        backend_url=url if settings.backend_url == DEFAULT_SQLITE_URL else settings.backend_url,
    )


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
            raise ConfigError(f"{name}[{i}] needs name, role and sha256 (and optional queues)")
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


def _queue_limits(name: str, raw: Any) -> dict[str, QueueLimit]:
    """A mapping of queue -> {max_depth: N, max_age_seconds: S} (YAML), or that mapping in JSON
    (environment)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting {name!r} must be a JSON object of queue limits: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"setting {name!r} must map queue names to limits, e.g. {{emails: {{max_depth: 1000}}}}")
    limits: dict[str, QueueLimit] = {}
    for queue, values in raw.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name}.{queue} must be a mapping such as {{max_depth: 1000}}")
        limit = _apply(QueueLimit(), values, f"{name}.{queue}")
        if limit.max_depth < 0:
            raise ConfigError(f"{name}.{queue}.max_depth must be 0 (no limit) or more, got {limit.max_depth}")
        if not 0 <= limit.max_age_seconds < math.inf:
            raise ConfigError(f"{name}.{queue}.max_age_seconds must be 0 (no limit) or more seconds, "
                              f"got {limit.max_age_seconds}")
        limits[str(queue)] = limit
    return limits


def _rate_limits(name: str, raw: Any) -> dict[str, Any]:
    """A mapping of task name -> "100/s" or {rate, burst, per_key} (YAML), or that mapping in
    JSON (environment); checked here, so a bad spec stops the server at startup."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting {name!r} must be a JSON object of rate limits: {exc}") from exc
    if not isinstance(raw, Mapping) or not all(isinstance(spec, str | Mapping) for spec in raw.values()):
        raise ConfigError(f"setting {name!r} must map task names to rates, e.g. {{send_email: 100/s}}")
    from .core.errors import InvalidArgument  # noqa: PLC0415 - the core imports this module
    from .core.limits import configured_limits  # noqa: PLC0415

    try:
        configured_limits(raw)
    except (InvalidArgument, TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: {exc}") from exc
    return {str(task): spec for task, spec in raw.items()}


def _coerce(name: str, current: Any, raw: Any) -> Any:
    if name == "tokens":
        return _tokens(name, raw)
    if name == "queue_limits":
        return _queue_limits(name, raw)
    if name == "rate_limits":
        return _rate_limits(name, raw)
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
