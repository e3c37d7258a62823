"""The dashboard in Chromium: log in, watch a queue fill and drain, pause and resume it, open a
failed task's traceback, cancel a running task, replay a dead letter, watch a chord's graph
turn green, and see every page (a screenshot of each is kept in build/screenshots/)."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from conveyor import chord, sig
from tests.browser.conftest import ADMIN_SECRET, VIEWER_SECRET, Dashboard, log_in, screenshot

FILL = 20


def test_log_in_with_a_token_and_out(page: Page, dashboard: Dashboard) -> None:
    page.goto(dashboard.url)
    page.get_by_test_id("token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("login-error")).to_contain_text("unknown bearer token")
    screenshot(page, "login")
    log_in(page, dashboard)
    expect(page.get_by_test_id("identity")).to_have_text("admin (admin)")
    expect(page.get_by_test_id("card-workers")).to_contain_text("1")
    screenshot(page, "overview")
    page.get_by_test_id("logout").click()
    expect(page.get_by_test_id("token")).to_be_visible()


def test_a_viewer_sees_pages_without_actions(page: Page, dashboard: Dashboard) -> None:
    log_in(page, dashboard, VIEWER_SECRET)
    page.goto(f"{dashboard.url}#/queues")
    expect(page.get_by_test_id("queue-default")).to_be_visible()
    expect(page.get_by_test_id("queue-default").get_by_test_id("pause")).to_be_hidden()


def test_a_queue_fills_while_paused_and_drains_when_resumed(page: Page, dashboard: Dashboard) -> None:
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/queues")
    row = page.get_by_test_id("queue-default")
    row.get_by_test_id("pause").click()
    expect(row.get_by_test_id("paused")).to_be_visible()
    dashboard.client.submit_batch([sig("add", i, i) for i in range(FILL)])
    # No reload: the page follows the queue through its event stream.
    expect(row.get_by_test_id("ready")).to_have_text(str(FILL))
    screenshot(page, "queues")
    row.get_by_test_id("resume").click()
    expect(row.get_by_test_id("paused")).to_be_hidden()
    expect(row.get_by_test_id("ready")).to_have_text("0")
    expect(row.get_by_test_id("in-flight")).to_have_text("0")


def test_a_failed_task_shows_its_traceback(page: Page, dashboard: Dashboard) -> None:
    failed = dashboard.client.submit("fail", "the disk is full")
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/tasks?state=FAILURE")
    page.get_by_test_id(f"task-{failed.task_id}").get_by_role("link").first.click()
    expect(page.get_by_test_id("traceback")).to_contain_text("ValueError: the disk is full")
    expect(page.get_by_test_id("timeline")).to_contain_text("FAILURE")
    expect(page.get_by_test_id("state").first).to_have_text("FAILURE")
    screenshot(page, "task-failed")
    page.goto(f"{dashboard.url}#/tasks")
    expect(page.get_by_test_id("task-list")).to_contain_text("fail")
    screenshot(page, "tasks")


def test_a_running_task_is_cancelled(page: Page, dashboard: Dashboard) -> None:
    running = dashboard.client.submit("sleep", 120)
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/tasks/{running.task_id}")
    expect(page.get_by_test_id("state").first).to_have_text("STARTED")
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("state").first).to_have_text("CANCELLED")
    expect(page.get_by_test_id("timeline")).to_contain_text("CANCELLED")
    expect(page.get_by_test_id("retry")).to_be_visible()


def test_a_dead_letter_is_replayed(page: Page, dashboard: Dashboard) -> None:
    dead = dashboard.client.submit(sig("fail", "replay me").set(queue="default"))
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/dead-letters")
    row = page.get_by_test_id(f"dead-{dead.task_id}")
    expect(row).to_contain_text("replay me")
    screenshot(page, "dead-letters")
    row.get_by_test_id("replay").click()
    expect(page.locator("#notice")).to_contain_text("Replayed as")
    expect(page.get_by_test_id(f"dead-{dead.task_id}")).to_have_count(0)


def test_a_chords_graph_turns_green(page: Page, dashboard: Dashboard) -> None:
    submitted = dashboard.client.submit(chord([sig("sleep", 1.5), sig("sleep", 2.0), sig("sleep", 2.5)], sig("tsum")))
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/workflows/{submitted.workflow_id}")
    nodes = page.get_by_test_id("node")
    expect(nodes).to_have_count(4)
    # While the members run, the callback waits; then every node turns SUCCESS, live.
    callback = page.locator("[data-test=node][data-name=tsum]")
    expect(callback).to_have_attribute("data-state", re.compile("PENDING|RECEIVED|STARTED"))
    screenshot(page, "workflow-running")
    for index in range(4):
        expect(nodes.nth(index)).to_have_attribute("data-state", "SUCCESS", timeout=30_000)
    expect(page.locator("[data-test=node][data-state=SUCCESS] rect").first).to_have_css("fill", "rgb(22, 163, 74)")
    screenshot(page, "workflow")
    callback.click()
    expect(page.get_by_test_id("result")).to_contain_text("6")


def test_every_page_renders(page: Page, dashboard: Dashboard) -> None:
    log_in(page, dashboard)
    for name, fragment, ready in [
        ("overview", "", "chart-throughput"), ("workers", "workers", "workers"),
        ("schedules", "schedules", "schedules"), ("limits", "limits", "limits"), ("tasks", "tasks", "task-list"),
    ]:
        page.goto(f"{dashboard.url}#/{fragment}")
        expect(page.get_by_test_id(ready)).to_be_visible()
        if name == "workers":
            expect(page.get_by_test_id("workers")).to_contain_text("python")
        screenshot(page, name)


def test_a_schedule_is_paused_and_resumed(page: Page, dashboard: Dashboard) -> None:
    created = page.request.post(f"{dashboard.url}api/v1/schedules", headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
                                data={"name": "hourly", "cron": "0 * * * *", "task": {"name": "add", "args": [1, 2]}})
    assert created.status == 201, created.text()
    log_in(page, dashboard)
    page.goto(f"{dashboard.url}#/schedules")
    row = page.get_by_test_id("schedule-hourly")
    expect(row.get_by_test_id("next-runs")).to_be_visible()
    row.get_by_test_id("pause-schedule").click()
    expect(row.get_by_test_id("schedule-paused")).to_be_visible()
    expect(row.get_by_test_id("next-runs")).to_be_hidden()
    screenshot(page, "schedule-paused")
    row.get_by_test_id("resume-schedule").click()
    expect(row.get_by_test_id("schedule-paused")).to_be_hidden()
    expect(row.get_by_test_id("next-runs")).to_contain_text(":00")
    deleted = page.request.delete(f"{dashboard.url}api/v1/schedules/hourly",
                                  headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    assert deleted.status == 204
