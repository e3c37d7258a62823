"""Rate limits and concurrency keys applied to a claim: which claimed tasks run now, and how
long each of the others waits in its queue (they are never failed for a limit).

A claim with no task under a limit costs nothing here: the limits are known in memory
(table.py), and only tasks whose name has a rate limit, or that carry a concurrency key, lead
to backend calls. Slots are taken before tokens: a slot not needed after all is given back at
once, while a token once taken is spent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ...brokers.base import Delivery
from .concurrency import ConcurrencySlots, Slot, is_keyed, wait_for_slot
from .rates import RateLimiter
from .table import RateLimitTable

if TYPE_CHECKING:
    from ..dispatch import Claimed, Lease


class DispatchLimits:
    def __init__(self, table: RateLimitTable, rates: RateLimiter, slots: ConcurrencySlots) -> None:
        self.table = table
        self.rates = rates
        self.slots = slots

    async def admit(self, claimed: list[Claimed]) -> tuple[list[Claimed], list[tuple[Delivery, float]]]:
        """The claimed tasks that may run now (those holding a slot have it on their lease),
        and the deliveries of the others with how long each waits."""
        limits = await self.table.current()
        keyed = [index for index, c in enumerate(claimed) if is_keyed(c.assignment.task)]
        rated = bool(limits) and any(c.assignment.task.name in limits for c in claimed)
        if not keyed and not rated:
            return claimed, []
        waits: dict[int, float] = {}
        if keyed:
            slots = [Slot(claimed[i].lease.task_id, claimed[i].assignment.task.concurrency_key,
                          claimed[i].assignment.task.concurrency_limit) for i in keyed]
            for index, slot, granted in zip(keyed, slots, await self.slots.acquire(slots), strict=True):
                if granted:
                    claimed[index].lease.concurrency_key = slot.key
                else:
                    waits[index] = wait_for_slot(claimed[index].lease.delivery.delivery_count)
        if rated:
            candidates = [index for index in range(len(claimed)) if index not in waits]
            decision = await self.rates.decide([claimed[i].assignment.task for i in candidates], limits)
            for position, delay in decision.deferred.items():
                waits[candidates[position]] = delay
            await self.release(claimed[candidates[position]].lease for position in decision.deferred)
        admitted = [c for index, c in enumerate(claimed) if index not in waits]
        return admitted, [(claimed[index].lease.delivery, delay) for index, delay in waits.items()]

    async def release(self, leases: Iterable[Lease]) -> None:
        """The attempts of these leases ended (or never began): free their concurrency slots."""
        held = []
        for lease in leases:
            if lease.concurrency_key:
                held.append((lease.task_id, lease.concurrency_key))
                lease.concurrency_key = ""
        if held:
            await self.slots.release(held)
