"""Chaos fixtures: settings that make faults recover fast (the `procs` fixture that stops
processes and shows their logs on failure comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["FAST_RECOVERY", "log_file"]

# Short leases and graces so that a killed process's tasks come back within seconds.
FAST_RECOVERY = {
    "CONVEYOR_LEASE_SECONDS": "3",
    "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CONVEYOR_STREAM_GRACE_SECONDS": "0.5",
    "CONVEYOR_RECOVER_INTERVAL_SECONDS": "0.5",
    # These suites kill workers on purpose, again and again: a task that happens to be in
    # flight on three of them is a victim, not a poison task (tests/e2e/test_poison.py).
    "CONVEYOR_MAX_DELIVERIES": "1000",
}


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.log"
    path.touch()
    return path
