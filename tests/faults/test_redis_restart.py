"""Fault a: the one Redis (broker and backend, AOF with fsync always) is stopped mid-load and started again on
the same port and data: once a clean SIGTERM shutdown, once a SIGKILL crash."""

from __future__ import annotations

import signal

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.scenarios import RedisRestart

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_redis_stopped_mid_load_and_restarted_on_its_aof_loses_nothing(
    run_fault: RunFault, signum: int
) -> None:
    row = await run_fault(RedisRestart(signum))
    assert_no_loss(row)
