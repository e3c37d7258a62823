"""Progress reported by a running task reaches its stored result, from sync and async tasks."""

from __future__ import annotations

import asyncio

from conveyor import Client, Worker, current_task
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.support.wait import wait_for


async def test_progress_from_sync_and_async_tasks() -> None:
    server = ConveyorServer(Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://"))
    port = await server.start()
    worker = Worker(f"127.0.0.1:{port}", concurrency=2)
    release = asyncio.Event()

    @worker.task("sync_steps")
    def sync_steps() -> str:  # runs in an executor thread
        current_task().progress({"done": 1, "of": 2})
        return "ok"

    @worker.task("async_steps")
    async def async_steps() -> str:
        current_task().progress(50)
        await release.wait()
        return "ok"

    running = asyncio.create_task(worker.run())
    try:
        async with Client(f"127.0.0.1:{port}") as client:
            finished = await client.submit("sync_steps")
            assert await client.result(finished.task_id, wait=10) == "ok"
            assert (await client.get_result(finished.task_id)).progress.json_value == '{"done":1,"of":2}'
            waiting = await client.submit("async_steps")

            async def half_done() -> bool:
                return (await client.get_result(waiting.task_id)).progress.int_value == 50

            await wait_for(half_done, 10.0, "the running task's progress stored")
            release.set()
            assert await client.result(waiting.task_id, wait=10) == "ok"
    finally:
        worker.stop()
        await running
        await server.stop()
