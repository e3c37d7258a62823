"""Tests between the unit tier and end to end: the SDK worker's execution pools with real child
processes, and an in-process server on the memory engines with an SDK worker. No services to
start, but processes, sockets and real time: a few seconds each, so kept out of tests/unit,
which tests the core as units in seconds all told."""
