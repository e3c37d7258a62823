"""Loaded by every Python process started with this directory on PYTHONPATH (bench/latency.py
--phases starts the server and its worker so): in the `conveyor serve` process alone, notes the
steps of each task (bench/phases.py) into the file CONVEYOR_BENCH_PHASES names."""

import os
import sys
from pathlib import Path

if os.environ.get("CONVEYOR_BENCH_PHASES") and "serve" in sys.argv:
    from bench.phases import install

    install(Path(os.environ["CONVEYOR_BENCH_PHASES"]))
