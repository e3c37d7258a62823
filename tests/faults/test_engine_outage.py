"""Every engine rides out its own outage (issue #22): the backend (Redis, nx-27017, memcached) out for 10 s while
chords complete, the Redis broker+backend down 10 s, the RabbitMQ and SQS brokers down 10 s mid-load (SQS losing
its queues: recovered through their re-creation and the repair of lost messages), the embedded SQLite file locked
for 3 s. Counted: nothing accepted is lost or stuck, every chord callback runs once, work resumes within 2 s of the
engine's return, and the client's calls fail only with UNAVAILABLE (retried with the same ids), never UNKNOWN or a
timeout.

tests/e2e/test_amqp_outage.py and tests/e2e/test_sqs_outage.py check more of the brokers' outages (a killed node,
a deleted queue, what a probe sees meanwhile, worker streams kept open).
"""

from __future__ import annotations

import signal

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.harness import Load, Row
from tests.faults.scenarios import (
    ENGINE_OUTAGE_SECONDS,
    SCENARIOS,
    BackendOutage,
    BrokerOutage,
    RedisRestart,
    SqliteLock,
)
from tests.fixtures.rabbitmq_node import server_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# From the engine's return to the first task that started after it.
RESUME_SECONDS = 2.0
# moto restarted without its queues: the server creates them again, and moto's first receives
# then answer slowly on a busy 2-core machine (one answered 3 s late in CI). Over seven runs on
# 2026-12-06 the resume took 0.9-3.0 s, with that day's code and with the code before it alike.
SQS_RESUME_SECONDS = 3.5
# The suite's load, but fewer lone tasks on nx-27017 and moto, whose pace (BackendOutage.tune, BrokerOutage.tune)
# would otherwise stretch the run past a minute; bench/faults.py runs the full load there.
LOADS = {"mongodb": Load(tasks=400), "sqs": Load(tasks=600)}


def assert_rode_it_out(row: Row, resume_seconds: float = RESUME_SECONDS) -> None:
    assert_no_loss(row)
    report = row.report()
    assert row.unexpected_client_errors() == {}, f"clients saw more than UNAVAILABLE:\n{report}"
    assert row.resume_seconds is not None, f"nothing ran after the engine came back:\n{report}"
    assert row.resume_seconds <= resume_seconds, f"work resumed {row.resume_seconds:.2f} s after the engine:\n{report}"


@pytest.mark.parametrize("engine", BackendOutage.ENGINES)
async def test_the_backend_out_for_10_s_while_chords_complete_loses_nothing(run_fault: RunFault, engine: str) -> None:
    row = await run_fault(BackendOutage(engine), LOADS.get(engine))
    assert_rode_it_out(row)
    assert row.client_errors["submit UNAVAILABLE"] > 0, f"no submit met the outage:\n{row.report()}"


async def test_redis_broker_and_backend_down_10_s_loses_nothing(run_fault: RunFault) -> None:
    row = await run_fault(RedisRestart(signal.SIGKILL, ENGINE_OUTAGE_SECONDS))
    assert_rode_it_out(row)
    assert row.client_errors["submit UNAVAILABLE"] > 0, f"no submit met the outage:\n{row.report()}"


async def test_the_sqlite_file_locked_for_3_s_loses_nothing(run_fault: RunFault) -> None:
    row = await run_fault(SqliteLock())
    assert_rode_it_out(row)


@pytest.mark.parametrize("name", ["rabbitmq-10s", "sqs-10s"])
async def test_a_broker_down_10_s_mid_load_loses_nothing(run_fault: RunFault, name: str) -> None:
    scenario = SCENARIOS[name]()
    assert isinstance(scenario, BrokerOutage)
    if scenario.broker == "rabbitmq" and server_script() is None:
        pytest.skip("rabbitmq-server is not installed")
    row = await run_fault(scenario, LOADS.get(scenario.broker))
    assert_rode_it_out(row, SQS_RESUME_SECONDS if scenario.broker == "sqs" else RESUME_SECONDS)
    if scenario.broker == "sqs":
        # Proved through both recoveries, or the test proved nothing about them.
        assert scenario.queues_recreated(), f"the server never created its lost queues again:\n{row.report()}"
        assert scenario.republished() > 0, f"the repair republished nothing the lost queues held:\n{row.report()}"
