"""Reading results: get, wait, watch (streams of state changes) and workflow trees."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_service_pb2

from ..backends.base import ChangeLog
from ..background import stop_in_background
from .canvas import Kind, NodeOutcome, kind_of, nodes_by_id, task_ids
from .canvas.reading import workflow_outcome
from .errors import InvalidArgument, NotFound
from .event_spans import EventSpan
from .planner import result_task_id
from .records import TERMINAL_STATES, TaskStates, is_terminal, task_key
from .store import Loaded, TaskStore

# A watch re-reads its tasks at least this often even without a change notification,
# so a lost notification can delay an event but never lose it.
RESCAN_SECONDS = 1.0
MAX_WATCHED_TASKS = 10_000
# A waiting GetResult follows the backend's change feed (other replicas' writes) only after
# this long while most results are recorded by the server the client asked, which tells it
# directly, and a quick task then costs no subscription at all.
FEED_AFTER_SECONDS = 0.02
# Once more than this share of recent waits were answered by other replicas' writes (replicas
# behind a load balancer), waits follow the feed at once instead: they would mostly sit out
# FEED_AFTER_SECONDS for nothing. The share is a moving average over about 1/FEED_SHARE_WEIGHT waits.
FEED_AT_ONCE_SHARE = 0.1
FEED_SHARE_WEIGHT = 0.05


class FeedUse:
    """How often this replica's waits end with a result recorded by another replica."""

    def __init__(self) -> None:
        self.share = 0.0

    def answered(self, elsewhere: bool) -> None:
        self.share += (float(elsewhere) - self.share) * FEED_SHARE_WEIGHT

    def delay(self) -> float:
        """How long a wait listens for this replica's own write before following the feed too."""
        return 0.0 if self.share > FEED_AT_ONCE_SHARE else FEED_AFTER_SECONDS
# A wait on a workflow gathers the changes of this long into one read of their records.
COALESCE_SECONDS = 0.02


class ResultReader:
    def __init__(self, store: TaskStore, running_here: Callable[[str], bool] = lambda task_id: False) -> None:
        self.store = store
        # Whether a worker connected to this replica holds the task: its result is then
        # recorded here, whatever other replicas' waits have told.
        self.running_here = running_here
        self.feed_use = FeedUse()

    async def get(self, task_id: str) -> result_pb2.TaskResult:
        """A task's result; for a workflow id, the whole workflow's (see workflow_result)."""
        plan = await self._plan_of(task_id)
        if plan is not None:
            return await self.workflow_result(plan)
        record = await self.store.get(task_id)
        if record is None:
            raise NotFound(
                f"no task with id {task_id!r} (unknown, or its result expired)",
                reason="TASK_NOT_FOUND", metadata={"task_id": task_id},
            )
        return record.result

    async def wait(self, task_id: str, wait_seconds: float) -> result_pb2.TaskResult:
        """The result once terminal, or as it stands when `wait_seconds` run out.

        A result this server records arrives straight from the store; the backend's change
        feed covers results recorded by other replicas.
        """
        plan = await self._plan_of(task_id)
        if plan is not None:
            return await self.workflow_result(plan, wait_seconds)
        loop = asyncio.get_running_loop()
        # Where this server's own terminal write of the record goes (_written_within swaps in
        # a fresh future when its time runs out).
        written: list[asyncio.Future[result_pb2.TaskResult | None]] = [loop.create_future()]

        def on_write(loaded: Loaded) -> None:
            if is_terminal(loaded.record) and not written[0].done():
                written[0].set_result(_copy(loaded.record.result))

        with self.store.on_write(task_id, on_write):
            # This server's own last write of the record answers as well as a read: a terminal
            # state is final, and a newer write by another replica reaches the change feed.
            mine = self.store.remembered([task_id]).get(task_id) if wait_seconds > 0 else None
            result = mine.record.result if mine is not None else await self.get(task_id)
            if result.state in TERMINAL_STATES or wait_seconds <= 0:
                return result
            deadline = loop.time() + wait_seconds
            # A task running here is recorded here, and a task not handed out yet mostly is too
            # unless other replicas record them: wait for that alone first (no task, no
            # subscription), then follow the change feed too. Only the waits for tasks not
            # running here tell how often other replicas answer.
            here = self.running_here(task_id)
            delay = FEED_AFTER_SECONDS if here else self.feed_use.delay()
            if delay > 0 and (found := await _written_within(written, min(delay, wait_seconds))) is not None:
                if not here:
                    self.feed_use.answered(elsewhere=False)
                return found
            written_here = written[0]
            elsewhere = asyncio.create_task(self._terminal_result(task_id))
            try:
                done, _ = await asyncio.wait({written_here, elsewhere}, timeout=max(deadline - loop.time(), 0),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Unsubscribing from the change feed must not delay the answer.
                stop_in_background(elsewhere)
        for finished in sorted(done, key=lambda future: future is not written_here):
            if (found := finished.result()) is not None:
                if not here:
                    self.feed_use.answered(elsewhere=finished is not written_here)
                return found
        return await self.get(task_id)

    async def _plan_of(self, target_id: str) -> records_pb2.WorkflowPlan | None:
        """The plan when `target_id` names a workflow (workflow ids start "wf-", as cancel reads them)."""
        return await self.store.plan(target_id) if target_id.startswith("wf-") else None

    async def workflow_result(self, plan: records_pb2.WorkflowPlan, wait_seconds: float = 0.0) -> result_pb2.TaskResult:
        """The whole workflow's result under its id, once its root ended or `wait_seconds` ran
        out: a group's list, a chain's last step's value, a chord's callback's (a failure: the
        error that ended it), combined from its tasks' records as the engine combines them.

        A wait re-reads only the records that changed (the backend's change feed names them),
        a few changes at a time, and combines again only when one of them ended: a group of
        1,000 costs about 1,000 record reads, not a million."""
        ids = task_ids(plan)
        records = {task_id: found.record for task_id, found in (await self.store.load(ids)).items()}
        outcome = workflow_outcome(plan, records)
        if outcome is not None or wait_seconds <= 0:
            return _workflow_task_result(plan, records, outcome)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        live = {t for t in ids if t not in records or not is_terminal(records[t])}
        changes = ChangeLog()
        wake = asyncio.Event()
        follower = asyncio.create_task(self._collect_changes([task_key(t) for t in live], changes, wake))
        try:
            stale = set(live)  # read again once subscribed: a change may have come in between
            while True:
                ended = False
                for task_id, found in (await self.store.load(sorted(stale))).items():
                    records[task_id] = found.record
                    if is_terminal(found.record):
                        live.discard(task_id)
                        ended = True
                if ended and (outcome := workflow_outcome(plan, records)) is not None:
                    return _workflow_task_result(plan, records, outcome)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return _workflow_task_result(plan, records, None)
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), min(RESCAN_SECONDS, remaining))
                except TimeoutError:
                    stale = set(live)  # no news for a while: read everything still running
                    continue
                await asyncio.sleep(COALESCE_SECONDS)
                stale = {key.removeprefix("task:") for key in changes.take()} & live
        finally:
            # Unsubscribing from the change feed (a round trip, and it may wait for the feed's
            # reader) goes on in the background: it must not hold the answer back.
            stop_in_background(follower)

    async def _collect_changes(self, keys: list[str], changes: ChangeLog, wake: asyncio.Event) -> None:
        async for keys_changed in self.store.backend.watch(keys):
            changes.note_all(keys_changed)
            wake.set()

    async def _terminal_result(self, task_id: str) -> result_pb2.TaskResult | None:
        last = None
        async for event in self.watch([task_id], until_done=True):
            last = event.result
        return last

    async def resolve_ids(self, task_ids_: Sequence[str], workflow_id: str) -> list[str]:
        ids = list(dict.fromkeys(task_ids_))
        if workflow_id:
            plan = await self.store.plan(workflow_id)
            if plan is None:
                raise NotFound(
                    f"no workflow with id {workflow_id!r}",
                    reason="WORKFLOW_NOT_FOUND", metadata={"workflow_id": workflow_id},
                )
            ids.extend(t for t in task_ids(plan) if t not in ids)
        elif not ids:
            raise InvalidArgument("name the task_ids or the workflow_id to watch")
        if len(ids) > MAX_WATCHED_TASKS:
            raise InvalidArgument(f"a watch covers at most {MAX_WATCHED_TASKS} tasks; got {len(ids)}")
        return ids

    async def watch(self, ids: Sequence[str], until_done: bool = True) -> AsyncIterator[result_pb2.TaskEvent]:
        """Every state change of the tasks, history first, one at a time (watch_batches)."""
        # aclosing: a consumer that stops early ends the watch (its subscriptions) at once.
        async with contextlib.aclosing(self.watch_batches(ids, until_done)) as batches:
            async for batch in batches:
                for span in batch:
                    for event in span.events():
                        yield event

    async def watch_batches(
        self, ids: Sequence[str], until_done: bool = True
    ) -> AsyncGenerator[list[EventSpan], None]:
        """Every state change of the tasks, history first, in batches of the changes found
        together (a span of new transitions per record); unknown ids are NOT_FOUND. Nothing
        to watch (a workflow without tasks, such as an empty group) ends at once.

        After the first read, only the records the change feed names are read again, so a
        watch over n tasks costs O(changes), not O(n) per change (a quiet spell still reads
        the open ones again, every RESCAN_SECONDS). A record this server writes comes straight
        from the store, with its version: it is not read again when the feed says that is the
        version written (nor at all once terminal, which is final)."""
        if not ids:
            return
        order = {task_id: place for place, task_id in enumerate(dict.fromkeys(ids))}
        sent = dict.fromkeys(order, 0)
        held = dict.fromkeys(order, 0)  # the version whose history was sent (0: none yet)
        open_ids = set(order)  # not terminal yet
        ended: set[str] = set()  # terminal and sent: never read again
        changes = ChangeLog()
        written_here: dict[str, Loaded] = {}  # this server's writes, not sent yet
        wake = asyncio.Event()

        def on_write(written: Loaded) -> None:
            task_id = written.record.result.task_id
            prior = written_here.get(task_id)
            if task_id not in ended and (prior is None or written.version > prior.version):
                written_here[task_id] = Loaded(_copy_record(written.record), written.version)
                wake.set()

        def needs_read(task_id: str, version: int | None) -> bool:
            """False when what this watch holds or has in hand is as new as the change."""
            if task_id not in order or task_id in ended:
                return False
            mine = written_here.get(task_id)
            if mine is not None and is_terminal(mine.record):
                return False
            newest = max(held[task_id], mine.version if mine is not None else 0)
            return version is None or version > newest

        follower = asyncio.create_task(self._collect_changes([task_key(t) for t in order], changes, wake))
        listening = contextlib.ExitStack()
        for task_id in order:
            listening.enter_context(self.store.on_write(task_id, on_write))
        try:
            stale = list(order)
            first = True
            while True:
                loaded = await self.store.load(stale) if stale else {}
                if first:
                    missing = [t for t in stale if t not in loaded]
                    if missing:
                        raise NotFound(
                            f"no task with id {missing[0]!r} (unknown, or its result expired)",
                            reason="TASK_NOT_FOUND", metadata={"task_id": missing[0]},
                        )
                    first = False
                fresh = [(t, found) for t in stale if (found := loaded.get(t)) is not None]
                fresh += sorted(written_here.items(), key=lambda item: order[item[0]])
                written_here.clear()
                batch: list[EventSpan] = []
                for task_id, found in fresh:
                    if task_id in ended or found.version <= held[task_id]:
                        continue  # sent already, or older than what was
                    held[task_id], record = found.version, found.record
                    if len(record.result.history) > sent[task_id]:
                        batch.append(EventSpan(record.result, sent[task_id]))
                    sent[task_id] = len(record.result.history)
                    if is_terminal(record):
                        open_ids.discard(task_id)
                        ended.add(task_id)
                    else:
                        open_ids.add(task_id)
                if batch:
                    yield batch
                if until_done and not open_ids:
                    return
                try:
                    await asyncio.wait_for(wake.wait(), RESCAN_SECONDS)
                except TimeoutError:
                    for task_id in open_ids:  # no news for a while: read the open ones
                        changes.note(task_key(task_id))
                # Taken and cleared together: a change noted during the next read wakes the next wait.
                taken = changes.take()
                wake.clear()
                stale = sorted(
                    (t for key in taken if needs_read(t := key.removeprefix("task:"), taken.versions.get(key))),
                    key=order.__getitem__,
                )
        finally:
            listening.close()
            # Unsubscribing from the change feed (a round trip, and it may wait for the feed's
            # reader) goes on in the background: it must not hold the answer back.
            stop_in_background(follower)

    async def workflow(self, workflow_id: str) -> task_service_pb2.GetWorkflowResponse:
        plan = await self.store.plan(workflow_id)
        if plan is None:
            raise NotFound(
                f"no workflow with id {workflow_id!r}",
                reason="WORKFLOW_NOT_FOUND", metadata={"workflow_id": workflow_id},
            )
        loaded = await self.store.load(task_ids(plan))
        nodes = nodes_by_id(plan)

        def build(node_id: str) -> task_service_pb2.WorkflowNode:
            node = nodes[node_id]
            kind = kind_of(node)
            view = task_service_pb2.WorkflowNode(node_id=node.node_id, kind=kind.label)
            if kind is Kind.TASK:
                found = loaded.get(node.task_id)
                if found is not None:
                    view.task.CopyFrom(found.record.result)
                    view.state = found.record.result.state
                return view
            view.children.extend(build(child) for child in node.child_ids)
            view.state = _aggregate([child.state for child in view.children])
            return view

        return task_service_pb2.GetWorkflowResponse(
            workflow_id=workflow_id, root=build(plan.root_node_id), result_task_id=result_task_id(plan)
        )


def _copy_record(record: records_pb2.TaskRecord) -> records_pb2.TaskRecord:
    copied = records_pb2.TaskRecord()
    copied.CopyFrom(record)
    return copied


def _copy(result: result_pb2.TaskResult) -> result_pb2.TaskResult:
    copied = result_pb2.TaskResult()
    copied.CopyFrom(result)
    return copied




def _workflow_task_result(
    plan: records_pb2.WorkflowPlan, records: dict[str, records_pb2.TaskRecord], outcome: NodeOutcome | None,
) -> result_pb2.TaskResult:
    """A workflow's result in the shape of a task's, under the workflow id."""
    root = nodes_by_id(plan)[plan.root_node_id]
    result = result_pb2.TaskResult(task_id=plan.workflow_id, workflow_id=plan.workflow_id, name=kind_of(root).label)
    results = [record.result for record in records.values()]
    queues = {r.queue for r in results}
    result.queue = queues.pop() if len(queues) == 1 else ""  # a scoped token reads only one-queue workflows
    submitted = [r.submitted_at for r in results if r.HasField("submitted_at")]
    if submitted:
        result.submitted_at.CopyFrom(min(submitted, key=lambda at: at.ToNanoseconds()))
    if outcome is None:
        started = any(r.state != TaskStates.TASK_STATE_PENDING for r in results)
        result.state = TaskStates.TASK_STATE_STARTED if started else TaskStates.TASK_STATE_PENDING
        return result
    if outcome.ok:
        result.state = TaskStates.TASK_STATE_SUCCESS
        result.result.CopyFrom(outcome.value)
        final = records.get(outcome.task_id)
        if final is not None and final.result.signature.ignore_result:
            result.signature.ignore_result = True  # so that clients know the value was not kept
    else:
        ended_as = (TaskStates.TASK_STATE_CANCELLED, TaskStates.TASK_STATE_EXPIRED)
        result.state = outcome.state if outcome.state in ended_as else TaskStates.TASK_STATE_FAILURE
        result.error.CopyFrom(outcome.error)
    finished = [r.finished_at for r in results if r.HasField("finished_at")]
    if finished:
        result.finished_at.CopyFrom(max(finished, key=lambda at: at.ToNanoseconds()))
    return result


def _aggregate(states: Sequence[result_pb2.TaskState.ValueType]) -> result_pb2.TaskState.ValueType:
    """A canvas node's state: failed or cancelled if any child is, done when all are."""
    if not states:
        return TaskStates.TASK_STATE_SUCCESS
    for worst in (TaskStates.TASK_STATE_FAILURE, TaskStates.TASK_STATE_EXPIRED, TaskStates.TASK_STATE_CANCELLED):
        if worst in states:
            return worst
    if all(state == TaskStates.TASK_STATE_SUCCESS for state in states):
        return TaskStates.TASK_STATE_SUCCESS
    if all(state == TaskStates.TASK_STATE_PENDING for state in states):
        return TaskStates.TASK_STATE_PENDING
    return TaskStates.TASK_STATE_STARTED


async def _written_within(
    written: list[asyncio.Future[result_pb2.TaskResult | None]], seconds: float
) -> result_pb2.TaskResult | None:
    """The result `written[0]` gets within `seconds`, else None (and a fresh future takes its
    place, for the writes after). Awaited itself, the future wakes this wait in the loop turn
    after the write; behind a shield or asyncio.wait it took a turn more, in which the code that
    recorded the result went on to its broker ack before the waiting client was answered."""
    first = written[0]
    loop = asyncio.get_running_loop()

    def time_up() -> None:
        if not first.done():
            written[0] = loop.create_future()
            first.set_result(None)

    timer = loop.call_later(seconds, time_up)
    try:
        return await first
    finally:
        timer.cancel()
