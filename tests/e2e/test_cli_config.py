"""`conveyor config example` and `conveyor serve --data-dir`: the printed config file is one the
server loads (every setting at its default), and the SQLite default goes where it is told."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor_server.config import Settings, load_settings
from tests.support.cli import conveyor
from tests.support.processes import Proc, free_port, serving, wait_for


@pytest.fixture
def example(tmp_path: Path) -> Path:
    ran = conveyor("config", "example")
    assert ran.code == 0, ran.err
    path = tmp_path / "conveyor.yaml"
    path.write_text(ran.out)
    return path


class Serving:
    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        """`conveyor serve ARGS` run in `cwd` on a free port (no dashboard)."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "conveyor_server.cli", "serve", "--port", str(port), *args]
        self.proc = Proc(argv, cwd / f"serve-{port}.log", {"CONVEYOR_HTTP_PORT": "0", **(env or {})}, cwd)

    def wait_ready(self) -> None:
        wait_for(lambda: serving(self.address) or not self.proc.alive(), 30, "the server to start")
        assert self.proc.alive(), self.proc.output()


@pytest.fixture
def servers() -> Iterator[list[Serving]]:
    started: list[Serving] = []
    try:
        yield started
    finally:
        for server in started:
            server.proc.stop()


def test_the_example_config_holds_every_setting_at_its_default(example: Path) -> None:
    assert load_settings(example, environ={}) == Settings()
    text = example.read_text()
    for setting in dataclasses.fields(Settings):
        assert f"\n{setting.name}:" in text, f"add {setting.name} to conveyor_server/config_example.py"
    for group in ("limits", "security"):
        for setting in dataclasses.fields(getattr(Settings(), group)):
            assert f"\n  {setting.name}:" in text, f"add {group}.{setting.name} to conveyor_server/config_example.py"


def test_serve_runs_on_the_example_config_with_its_file_in_the_data_dir(
    tmp_path: Path, example: Path, servers: list[Serving]
) -> None:
    cwd, data = tmp_path / "cwd", tmp_path / "data" / "nested"
    cwd.mkdir()
    servers.append(server := Serving(cwd, "--config", str(example), "--data-dir", str(data)))
    server.wait_ready()
    submitted = conveyor("submit", "add", "1", "2", address=server.address)
    assert submitted.code == 0, submitted.err
    assert (data / "conveyor.db").is_file()
    assert not (cwd / "conveyor.db").exists()
    assert conveyor("get", submitted.out.strip(), address=server.address).out == "PENDING\n"


def test_data_dir_from_the_environment_and_an_explicit_url_wins(tmp_path: Path, servers: list[Serving]) -> None:
    cwd, data, elsewhere = tmp_path, tmp_path / "data", tmp_path / "elsewhere.db"
    servers.append(server := Serving(cwd, "--backend", f"sqlite:///{elsewhere}", env={"CONVEYOR_DATA_DIR": str(data)}))
    server.wait_ready()
    assert conveyor("submit", "noop", address=server.address).code == 0
    assert (data / "conveyor.db").is_file()  # the broker: left at the default, so in the data dir
    assert elsewhere.is_file()  # the backend: set explicitly
    assert not (cwd / "conveyor.db").exists()


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    ran = conveyor("serve", "--port", "0", "--data-dir", str(blocker / "sub"))
    assert ran.code == 2
    assert ran.err.startswith(f"conveyor: cannot use the data directory {blocker / 'sub'}: "), ran.err
    assert len(ran.err.splitlines()) == 1
