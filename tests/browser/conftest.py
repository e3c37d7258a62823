"""Browser tests of the dashboard: a real `conveyor serve` (SQLite, tokens on, the dashboard on a
free port), a real worker process, and Debian's Chromium driven by Playwright (launched by its
executable path: no browser download). Screenshots of each page go to build/screenshots/."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from conveyor import SyncClient
from tests.support.processes import REPO, Server, WorkerProc, free_port, wait_for

SCREENSHOTS = REPO / "build" / "screenshots"
# Assertions wait this long for the page (5 s by default): CI machines are slow and shared.
expect.set_options(timeout=20_000)
ADMIN_SECRET = "browser-admin-secret"
VIEWER_SECRET = "browser-viewer-secret"


def _token(name: str, role: str, secret: str) -> dict[str, str]:
    return {"name": name, "role": role, "sha256": hashlib.sha256(secret.encode()).hexdigest()}


@dataclass
class Dashboard:
    url: str
    server: Server
    client: SyncClient


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}api/v1/session", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _workers(url: str) -> int:
    request = urllib.request.Request(f"{url}api/v1/workers", headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return len(json.load(response)["workers"])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    logs = tmp_path_factory.mktemp("dashboard")
    db = logs / "conveyor.db"
    port = free_port()
    tokens = [_token("admin", "admin", ADMIN_SECRET), _token("viewer", "viewer", VIEWER_SECRET)]
    env = {"CONVEYOR_HTTP_PORT": str(port), "CONVEYOR_SECURITY__TOKENS": json.dumps(tokens),
           "CONVEYOR_TOKEN": ADMIN_SECRET}
    server = Server(logs, f"sqlite:///{db}", f"sqlite:///{db}", env=env, wait=False)
    worker: WorkerProc | None = None
    try:
        server.wait_ready()
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _answers(url), 20, "the dashboard answers")
        worker = WorkerProc(logs, server.address, env={"CONVEYOR_TOKEN": ADMIN_SECRET})
        wait_for(lambda: _workers(url) == 1, 30, "the worker connected")
        with SyncClient(server.address, token=ADMIN_SECRET) as client:
            assert client.result(client.submit("add", 1, 1), 30) == 2  # the queue exists, the worker runs
            yield Dashboard(url, server, client)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


# Module scope, not session: the sync Playwright API keeps an event loop running in this thread
# while it is open, and asyncio tests in other modules could not start theirs.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; scripts/test does it)")
    with sync_playwright() as playwright:
        playwright.selectors.set_test_id_attribute("data-test")
        launched = _launch(playwright, executable)
        yield launched
        launched.close()


def _launch(playwright: Playwright, executable: str) -> Browser:
    # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
    return playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(20_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


def log_in(page: Page, dashboard: Dashboard, secret: str = ADMIN_SECRET) -> None:
    page.goto(dashboard.url)
    page.get_by_test_id("token").fill(secret)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("identity")).to_be_visible()


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
