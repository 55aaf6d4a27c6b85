"""The HTTP API against the real app on uvicorn, real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import httpx
import pytest

TERMINAL = {"succeeded", "failed", "cancelled"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def wait_status(client: httpx.AsyncClient, job_id: str, statuses: set[str], timeout: float = 30) -> dict:
    with anyio.fail_after(timeout):
        while True:
            snap = (await client.get(f"/api/jobs/{job_id}")).json()
            if snap["status"] in statuses:
                return snap
            await anyio.sleep(0.05)


async def test_submit_runs_to_success_with_ordered_events(db_url, make_settings, make_token, live_server) -> None:
    settings = make_settings(database_url=db_url)
    token = await make_token(role="submitter", database_url=db_url)
    async with live_server(settings) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        resp = await client.post("/api/jobs", json={"prompt": "Add a health check", "maxTurns": 20})
        assert resp.status_code == 201, resp.text
        job = resp.json()
        assert job["status"] == "queued"
        assert job["roomId"] == f"job:{job['id']}"
        assert job["demo"] is False  # not known yet: the worker that runs it decides

        final = await wait_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert final["demo"] is True  # that worker has no CLI: the replay program ran it
        assert final["result"]["ok"] is True
        assert final["progress"]["total"] > 0 and final["progress"]["done"] == final["progress"]["total"]

        page = (await client.get(f"/api/jobs/{job['id']}/events", params={"limit": 1000})).json()
        items = page["items"]
        ids = [e["id"] for e in items]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert len(set(ids)) == len(ids)
        kinds = {e["kind"] for e in items}
        assert {"status", "phase", "step", "todo", "usage", "result"} <= kinds
        statuses = [e["data"]["status"] for e in items if e["kind"] == "status"]
        assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
        assert items[-1]["kind"] in ("status", "result", "usage", "worker")

        # Reading on from the middle returns exactly the rest.
        mid = ids[len(ids) // 2]
        rest = (await client.get(f"/api/jobs/{job['id']}/events", params={"since": mid})).json()
        assert [e["id"] for e in rest["items"]] == ids[len(ids) // 2 + 1 :]
        assert rest["gap"] is False


async def test_list_is_newest_first_filtered_and_paginated(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    token = await make_token(role="submitter")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        created = []
        for i in range(5):
            resp = await client.post("/api/jobs", json={"prompt": f"job {i}"})
            assert resp.status_code == 201
            created.append(resp.json()["id"])
        first = (await client.get("/api/jobs", params={"limit": 2})).json()
        assert [j["id"] for j in first["items"]] == created[::-1][:2]
        second = (await client.get("/api/jobs", params={"limit": 2, "cursor": first["nextCursor"]})).json()
        assert [j["id"] for j in second["items"]] == created[::-1][2:4]
        queued = (await client.get("/api/jobs", params={"status": "queued", "limit": 50})).json()
        assert {j["id"] for j in queued["items"]} == set(created)
        running = (await client.get("/api/jobs", params={"status": "running"})).json()
        assert running["items"] == []


async def test_authentication_and_roles(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    viewer = await make_token(role="viewer")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base) as client:
        resp = await client.get("/api/jobs")
        assert resp.status_code == 401
        assert "Bearer" in resp.json()["detail"]
        resp = await client.get("/api/jobs", headers=bearer("ps_not-a-real-token"))
        assert resp.status_code == 401
        resp = await client.get("/api/jobs", headers={"Authorization": "Basic abc"})
        assert resp.status_code == 401
        resp = await client.post("/api/jobs", json={"prompt": "x"}, headers=bearer(viewer))
        assert resp.status_code == 403
        assert "submitter" in resp.json()["detail"]
        # A viewer may still read and get tickets.
        assert (await client.get("/api/jobs", headers=bearer(viewer))).status_code == 200
        ticket = await client.post("/api/ws-tickets", headers=bearer(viewer))
        assert ticket.status_code == 201
        assert ticket.json()["expiresIn"] == 60 and ticket.json()["ticket"].startswith("pst_")
        me = (await client.get("/api/me", headers=bearer(viewer))).json()
        assert me["role"] == "viewer" and me["teamName"] == "t1" and me["userName"].startswith("viewer-")
        assert (await client.get("/api/me")).status_code == 401
        # A ticket is for the WebSocket only, never an HTTP credential.
        resp = await client.get("/api/jobs", headers=bearer(ticket.json()["ticket"]))
        assert resp.status_code == 401


async def test_other_teams_jobs_are_not_found(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    mine = await make_token(role="admin", team="alpha")
    theirs = await make_token(role="admin", team="beta")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base) as client:
        job = (await client.post("/api/jobs", json={"prompt": "secret"}, headers=bearer(mine))).json()
        for method, path in [
            ("GET", f"/api/jobs/{job['id']}"),
            ("GET", f"/api/jobs/{job['id']}/events"),
            ("POST", f"/api/jobs/{job['id']}/cancel"),
        ]:
            foreign = await client.request(method, path, headers=bearer(theirs))
            missing = await client.request(method, path.replace(job["id"], "0" * 32), headers=bearer(theirs))
            assert foreign.status_code == missing.status_code == 404, (path, foreign.text)
            assert foreign.json() == missing.json()
        listed = (await client.get("/api/jobs", headers=bearer(theirs))).json()
        assert listed["items"] == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "extra": 1}, "extra"),
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "maxTurns": 0}, "maxTurns"),
        ({"prompt": "x", "maxTurns": "ten"}, "maxTurns"),
        ({"prompt": "x", "permissionMode": "yolo"}, "permissionMode"),
        ({"prompt": "x", "timeoutSeconds": 10**9}, "timeoutSeconds"),
        ({"prompt": "x", "model": "bad model; rm -rf"}, "model"),
        ({"prompt": "x", "workdir": "../outside"}, "workdir"),
        ({"prompt": "x", "workdir": "/etc"}, "workdir"),
        ({"prompt": "x", "workdir": "missing-dir"}, "workdir"),
        ({"prompt": "x", "workdir": "escape"}, "workdir"),
        ({"prompt": "x", "allowedTools": ["Bash", 3]}, "allowedTools"),
        # Tools the CLI no longer has are refused by name (the CLI would ignore them silently).
        ({"prompt": "x", "allowedTools": ["Read", "Glob"]}, "unknown tool Glob"),
        ({"prompt": "x", "allowedTools": ["MultiEdit(src/*)"]}, "unknown tool MultiEdit"),
        ([1, 2], ""),
        ("just a string", ""),
    ],
)
async def test_bad_submissions_get_a_4xx_that_names_the_field(
    body, needle, make_settings, make_token, live_server, workspace: Path
) -> None:
    (workspace / "escape").symlink_to("/tmp")
    settings = make_settings()
    token = await make_token(role="submitter")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        resp = await client.post("/api/jobs", json=body)
        assert resp.status_code == 400, resp.text
        assert needle in resp.text
        assert (await client.get("/api/jobs")).json()["items"] == []


async def test_the_clis_permission_modes_and_tools_are_accepted(make_settings, make_token, live_server) -> None:
    from progress_service.events import PERMISSION_MODES  # noqa: PLC0415

    settings = make_settings()
    token = await make_token(role="submitter")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        for mode in PERMISSION_MODES:
            resp = await client.post("/api/jobs", json={"prompt": "x", "permissionMode": mode})
            assert resp.status_code == 201, (mode, resp.text)
        tools = ["Agent", "Bash(git *)", "Edit", "TaskCreate", "TaskUpdate", "TodoWrite", "mcp__github__create_issue"]
        resp = await client.post("/api/jobs", json={"prompt": "x", "permissionMode": "auto", "allowedTools": tools})
        assert resp.status_code == 201, resp.text
    assert {"auto", "manual", "acceptEdits", "bypassPermissions", "plan", "dontAsk"} <= set(PERMISSION_MODES)


async def test_malformed_requests_never_500(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    token = await make_token(role="submitter")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        job = (await client.post("/api/jobs", json={"prompt": "x"})).json()
        cases = [
            client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"}),
            client.post("/api/jobs", content=os.urandom(64), headers={"content-type": "application/json"}),
            client.get(f"/api/jobs/{job['id']}/events", params={"since": "yesterday"}),
            client.get(f"/api/jobs/{job['id']}/events", params={"limit": 0}),
            client.get("/api/jobs", params={"cursor": "@@@"}),
            client.get("/api/jobs", params={"status": "exploded"}),
            client.get("/api/jobs", params={"limit": 100000}),
            client.get("/api/jobs/..%2F..%2Fetc"),
            client.get("/api/jobs/" + "a" * 300),
        ]
        for coro in cases:
            resp = await coro
            assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code, resp.text)


async def test_cancel_a_queued_job(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    token = await make_token(role="submitter")
    # No worker: the job stays queued, and the cancel settles it directly.
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        job = (await client.post("/api/jobs", json={"prompt": "x"})).json()
        resp = await client.post(f"/api/jobs/{job['id']}/cancel")
        assert resp.status_code == 202
        snap = await wait_status(client, job["id"], TERMINAL, timeout=5)
        assert snap["status"] == "cancelled"
        events = (await client.get(f"/api/jobs/{job['id']}/events")).json()["items"]
        assert events[-1]["kind"] == "status" and events[-1]["data"]["status"] == "cancelled"


async def test_ops_endpoints(make_settings, live_server) -> None:
    async with live_server(make_settings(), run_worker=False) as base, httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        ready = (await client.get("/readyz")).json()
        assert ready == {"status": "ok", "checks": {"redis": "ok", "store": "ok"}}
        schema = (await client.get("/schema/openapi.json")).json()
        assert "/api/jobs" in schema["paths"]
        metrics = await client.get("/metrics")
        assert "ps_ws_connections" in metrics.text


async def test_step_detail_and_raw_log_download(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    token = await make_token(role="submitter")
    async with live_server(settings) as base, httpx.AsyncClient(base_url=base, headers=bearer(token)) as client:
        job = (await client.post("/api/jobs", json={"prompt": "Add a health check"})).json()
        await wait_status(client, job["id"], TERMINAL)
        log = await client.get(f"/api/jobs/{job['id']}/log.jsonl")
        assert log.status_code == 200 and log.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in log.text.splitlines()]
        events = (await client.get(f"/api/jobs/{job['id']}/events", params={"limit": 1000})).json()["items"]
        assert [e["id"] for e in lines] == [e["id"] for e in events]
        finished = next(e for e in lines if e["kind"] == "step" and e["data"]["state"] != "started")
        step_id = finished["data"]["stepId"]
        detail = (await client.get(f"/api/jobs/{job['id']}/steps/{step_id}")).json()
        (attempt,) = detail["attempts"]
        assert attempt["step"]["state"] == finished["data"]["state"] and attempt["step"]["input"]
        assert attempt["startedAt"] <= attempt["finishedAt"]
        missing = await client.get(f"/api/jobs/{job['id']}/steps/nope")
        assert missing.status_code == 404 and "step" in missing.json()["detail"]
        assert (await client.get("/api/jobs/zzz/log.jsonl")).status_code == 404
        spec = (await client.get(f"/api/jobs/{job['id']}/spec")).json()
        assert spec == {"prompt": "Add a health check"}
