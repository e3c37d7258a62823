"""Faults b and c: one engine becomes unreachable for 3 s (its TCP proxy is cut) while the other stays up.

b. The backend is cut while chords are completing: member results, group counting and the callback's
   publication meet the outage.
c. The broker is cut during the submit burst: submits fail with a transient status and the client sends them
   again with the same ids; whatever it was finally told was accepted must run.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.scenarios import EngineCut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_backend_unreachable_for_3_s_while_chords_complete_loses_nothing(run_fault: RunFault) -> None:
    row = await run_fault(EngineCut("backend"))
    assert_no_loss(row)


async def test_broker_unreachable_for_3_s_during_a_submit_burst_loses_nothing(run_fault: RunFault) -> None:
    row = await run_fault(EngineCut("broker"))
    assert_no_loss(row)
