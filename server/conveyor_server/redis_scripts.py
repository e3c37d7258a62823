"""Running Lua scripts in one pipelined round trip, for both Redis engines.

The pipeline sends EVALSHA itself: a registered script run on a pipeline would first ask SCRIPT
EXISTS, one more round trip on every call (and redis-py's cluster pipeline has no evalsha()).
When Redis lost its script cache (a restart, SCRIPT FLUSH), the calls that met NoScriptError
did not run at all, and only they are run again, each through its script object, which loads
it; the others ran and are never run twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

# One script call: the script, its keys, its arguments.
ScriptCall = tuple[AsyncScript, list[str], list[Any]]


async def run_scripts(
    client: Any, calls: Sequence[ScriptCall], before: Callable[[Any], int] | None = None
) -> list[Any]:
    """The replies of `calls`, in order, from one round trip; the first error raised.

    `before(pipeline)` may queue other commands ahead of the scripts and returns how many; their
    replies are dropped (errors included)."""
    async with client.pipeline(transaction=False) as pipe:
        skipped = before(pipe) if before is not None else 0
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results: list[Any] = (await pipe.execute(raise_on_error=False))[skipped:]
    for index, result in enumerate(results):
        if isinstance(result, NoScriptError):
            script, keys, args = calls[index]
            results[index] = await script(keys=keys, args=args)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
