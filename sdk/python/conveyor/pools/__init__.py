"""Execution pools: where a worker runs its tasks (threads, child processes or the event loop)."""
