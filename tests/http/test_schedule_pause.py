"""Pausing and resuming a schedule through the HTTP API (issue #18): a paused schedule shows no
next runs, an unknown one is 404, and a viewer may not pause."""

from __future__ import annotations

from tests.http.test_api import Api, api, error_of

__all__ = ["api"]  # the fixture used below


async def test_a_schedule_is_paused_and_resumed(api: Api) -> None:
    body = {"name": "hourly", "cron": "0 * * * *", "task": {"name": "add", "args": [1, 2]}}
    assert (await api.admin.post("/api/v1/schedules", json=body)).json()["paused"] is False
    paused = await api.admin.post("/api/v1/schedules/hourly/pause")
    assert paused.status_code == 200
    assert (paused.json()["paused"], paused.json()["next_runs"]) == (True, [])
    [listed] = (await api.viewer.get("/api/v1/schedules")).json()["schedules"]
    assert listed["paused"] is True
    error_of(await api.viewer.post("/api/v1/schedules/hourly/resume"), 403)
    resumed = (await api.admin.post("/api/v1/schedules/hourly/resume")).json()
    assert resumed["paused"] is False and resumed["next_runs"][0].endswith(":00:00.000Z")
    for action in ("pause", "resume"):
        assert "no schedule named 'nope'" in error_of(await api.admin.post(f"/api/v1/schedules/nope/{action}"),
                                                      404)["message"]
    assert (await api.admin.delete("/api/v1/schedules/hourly")).status_code == 204
