"""Every ```python block of README.md runs as written, against a live server and worker.

Blocks are taken in file order. A block whose first line names a module (`# tasks.py`) and
that defines a Worker is written to that module and run with `conveyor worker MODULE`; it
replaces the worker of the block before it, so each later block runs against the tasks just
shown. Any other block runs as a script (`CONVEYOR_ADDRESS` set, the modules importable) and
must exit 0; a `print(...)  # 5` line must print 5. A block that is a fragment, not a program,
is skipped when the line right before it is `<!-- snippet: skip (why) -->`; keep those rare.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import REPO, Proc, Server, wait_for_workers

README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- snippet: skip \((.+?)\) -->\s*$")
MODULE = re.compile(r"^# (\w+)\.py\b")
# `print(...)  # 35`: a number the line must print.
PRINTS = re.compile(r"print\(.*#\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Snippet:
    line: int
    code: str
    skip: str  # why it is skipped; empty when it runs

    @property
    def module(self) -> str:
        """The module a worker block defines; empty for a script."""
        named = MODULE.match(self.code)
        return named.group(1) if named and "Worker(" in self.code else ""

    @property
    def expected(self) -> list[str]:
        return [m.group(1) for m in map(PRINTS.search, self.code.splitlines()) if m]


def snippets(text: str) -> list[Snippet]:
    found = []
    for block in BLOCK.finditer(text):
        before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append(Snippet(text.count("\n", 0, block.start()) + 1, block.group(1), skip.group(1) if skip else ""))
    return found


def test_the_readme_has_snippets_and_few_skips() -> None:
    found = snippets(README.read_text())
    assert sum(not s.skip for s in found) >= 4
    assert sum(bool(s.skip) for s in found) <= 3, "skip only fragments that cannot run on their own"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    url = f"sqlite:///{tmp_path / 'readme.db'}"
    started = Server(tmp_path, url, url)
    try:
        yield started
    finally:
        started.stop()


def test_every_python_snippet_runs(tmp_path: Path, server: Server) -> None:
    env = {**os.environ, "CONVEYOR_ADDRESS": server.address}
    worker: Proc | None = None
    try:
        for snippet in snippets(README.read_text()):
            if snippet.skip:
                continue
            if snippet.module:
                (tmp_path / f"{snippet.module}.py").write_text(snippet.code)
                if worker is not None:
                    worker.stop()
                argv = [sys.executable, "-m", "conveyor_server.cli", "worker", snippet.module]
                worker = Proc(argv, tmp_path / f"worker-{snippet.module}.log",
                              env={"CONVEYOR_ADDRESS": server.address}, cwd=tmp_path)
                wait_for_workers(server.address, 1, exactly=True)
                continue
            script = tmp_path / f"snippet_{snippet.line}.py"
            script.write_text(snippet.code)
            ran = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=120, check=False)
            where = f"README.md line {snippet.line}"
            assert ran.returncode == 0, f"{where} exited {ran.returncode}:\n{ran.stderr}"
            printed = ran.stdout.split()
            assert all(value in printed for value in snippet.expected), f"{where} printed {ran.stdout!r}"
    finally:
        if worker is not None:
            worker.stop()
