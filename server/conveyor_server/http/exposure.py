"""The dashboard's exposure rule, apart from the HTTP stack so the server checks it at once."""

from __future__ import annotations

from ..config import ConfigError, Settings
from ..security import is_loopback


def check_http_exposure(settings: Settings) -> None:
    """A dashboard beyond this machine needs tokens, as gRPC does (security.check_exposure)."""
    security = settings.security
    if not settings.http_port or is_loopback(settings.http_host) or security.tokens:
        return
    if security.allow_public_without_auth:
        return
    raise ConfigError(
        f"refusing to serve the dashboard on {settings.http_host} without authentication: configure "
        "security.tokens (an admin or viewer token logs in), set security.allow_public_without_auth: true "
        "if something else protects it, or turn it off with http_port: 0"
    )
