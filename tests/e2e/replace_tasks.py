"""Tasks that replace themselves (conveyor.replace), for tests/e2e/test_replace.py; run by
`conveyor worker tests.e2e.replace_tasks`, with canvas_tasks' tasks (add, identity, tsum, fail,
note, note_error) too. The Celery ones mirror celery/t/integration/tasks.py."""

from __future__ import annotations

from typing import Any

from conveyor import chain, group, replace, si, sig
from conveyor.replacement import Replacement
from tests.e2e.canvas_tasks import worker

__all__ = ["worker"]


@worker.task("raise_value_error")
def raise_value_error(*_: Any) -> None:
    """Celery's raise_error."""
    raise ValueError("deliberate error")


@worker.task("add_replaced")
def add_replaced(x: Any, y: Any) -> Replacement:
    """Celery's add_replaced: add(x, y), through a replacement."""
    return replace(sig("add", x, y))


@worker.task("add_replaced_async")
async def add_replaced_async(x: Any, y: Any) -> Replacement:
    """add_replaced, as an async task (run by the event loop pool)."""
    return replace(sig("add", x, y))


@worker.task("fail_replaced")
def fail_replaced(*args: Any) -> Replacement:
    """Celery's fail_replaced: replaced by fail."""
    return replace(si("fail", *args))


@worker.task("replace_with_chain")
def replace_with_chain(*args: Any, link_msg: str | None = None) -> Replacement:
    """Celery's replace_with_chain: identity(*args) | identity(), linked to note(link_msg)."""
    replacement = chain(sig("identity", *args), sig("identity"))
    return replace(replacement.link(si("note", link_msg)) if link_msg is not None else replacement)


@worker.task("replace_with_chain_which_raises")
def replace_with_chain_which_raises(*args: Any, link_msg: str | None = None) -> Replacement:
    """Celery's replace_with_chain_which_raises: identity(*args) | raise_error, its errback note(link_msg)."""
    replacement = chain(sig("identity", *args), sig("raise_value_error"))
    return replace(replacement.link_error(si("note", link_msg)) if link_msg is not None else replacement)


@worker.task("replace_with_empty_chain")
def replace_with_empty_chain(*_: Any) -> Replacement:
    """Celery's replace_with_empty_chain: refused (a chain needs a step)."""
    return replace(chain())


@worker.task("replace_with_group")
def replace_with_group(n: int) -> Replacement:
    """[100, 101, ..., 100 + n - 1], through a group that replaces it."""
    return replace(group(sig("add", i, 100) for i in range(n)))


@worker.task("replace_with_tsum")
def replace_with_tsum(values: list[int]) -> Replacement:
    """A chord callback that hands its list to tsum, which replaces it."""
    return replace(sig("tsum", values))


@worker.task("replace_with_taken_id")
def replace_with_taken_id(task_id: str) -> Replacement:
    """An invalid replacement: its task reuses an id that exists."""
    return replace(sig("add", 1, 1).set(id=task_id))
