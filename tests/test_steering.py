"""Steering a running job with the real Claude Code CLI: instructions and permission answers.

The pinned CLI talks to the scripted model server; instructions go through
the gateway (WebSocket ``steer`` and ``POST /api/jobs/{id}/instructions``),
the worker writes them to the CLI's stdin, and the model server's recorded
requests show where they reached the conversation. Jobs of one test run side
by side on one worker.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import cli_scenarios as sc
from cli_watch import submit
from gateway_helpers import auth, connect, join, recv_type, send
from model_server import Script, ToolUse, reply
from progress_service.events import EventMsg
from progress_service.keys import inbox_key, lease_key, run_key, steer_key
from progress_service.terminal.describe import format_event

pytestmark = pytest.mark.usefixtures("claude_env")

KEYWORD = "STEER-WRITE-NOTES"
STEER_TEXT = f"Please also write the notes file. {KEYWORD}"


class Room:
    """A WebSocket member of one job's room: every message kept, waits by predicate."""

    def __init__(self, ws: Any, job_id: str) -> None:
        self.ws = ws
        self.job_id = job_id
        self.seen: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def pump(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            self.seen += msg if isinstance(msg, list) else [msg]
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                for m in self.seen:
                    if pred(m):
                        return m
                await self._changed.wait()

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.seen if m.get("type") == "event" and m.get("kind") == kind]

    async def ended(self, timeout: float = 90.0) -> dict[str, Any]:
        return await self.wait_for(
            lambda m: m.get("type") == "event" and m.get("kind") == "status"
            and m["data"]["status"] in ("succeeded", "failed", "cancelled"),
            timeout,
        )


def is_event(kind: str, **data: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "event" and m.get("kind") == kind and all(m["data"].get(k) == v for k, v in data.items())


def is_reply(request_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") in ("ack", "error") and m.get("requestId") == request_id


async def open_room(stack: Any, tg: Any, base: str, token: str, job_id: str) -> Room:
    ws = await stack.enter_async_context(connect(base, max_queue=None))
    await auth(ws, token)
    await join(ws, job_id)
    room = Room(ws, job_id)
    tg.start_soon(room.pump)
    return room


def steer_repo(workspace: Path, name: str) -> None:
    sc.Scenario(name=name, prompt="", turns=[]).make_repo(workspace / name)


@pytest.fixture
async def service(claude_bin, model_server, make_settings, make_token, live_server, tmp_path):
    """A live server and worker running the real CLI; tokens of each role in team t1."""
    settings = make_settings(
        claude_bin=claude_bin, claude_stdout_dir=str(tmp_path / "stdout"), worker_concurrency=4,
        # The expiring prompt is waited out (so the shorter, the faster), but
        # the others are answered first, one through a `decide` subprocess:
        # 10 s was too short for that on two saturated cores.
        permission_timeout=30.0, steer_ack_timeout=45.0,
    )
    tokens = {role: await make_token(role=role) for role in ("submitter", "reviewer", "viewer")}
    async with live_server(settings) as base:
        yield base, tokens, settings


def client(base: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)


async def audit_records(settings: Any, action: str) -> list[Any]:
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store.audit import keys  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415

    engine = create_engine(settings.database_url)
    try:
        records = await audit.list_records(engine, team_id=await audit.team_id_for(engine, "t1"), action=action, limit=100)
        # As `progress-service audit verify` does: the server's key file.
        result = await audit.verify(engine, keys=keys.read_keyring(keys.key_file_path(settings)))
    finally:
        await engine.dispose()
    assert result.ok, result.mismatch
    return records


async def test_instructions_reach_the_running_cli(service, model_server, workspace, tmp_path) -> None:
    """WS and HTTP instructions: delivered into the next model request, acked after the echo, once per request id."""
    base, tokens, settings = service
    pace = {"delay": 4.0}  # the window in which the instruction is sent
    branch = Script(
        turns=[reply(ToolUse("Bash", {"command": "echo steered > NOTES.md", "description": "Write notes"}))],
        final="Wrote the notes as asked.",
    )
    spec = {"permissionMode": "acceptEdits", "allowedTools": ["Bash(echo *)"]}
    turns = [
        reply(ToolUse("Bash", {"command": "echo one", "description": "One"})),
        reply(ToolUse("Bash", {"command": "echo two", "description": "Two"}), **pace),
    ]
    for name in ("steer_ws", "steer_http"):
        steer_repo(workspace, name)
    marker_ws = model_server.script("steer_ws", turns, final="Not steered.", branches={KEYWORD: branch})
    marker_http = model_server.script("steer_http", turns, final="Not steered.", branches={KEYWORD: branch})
    async with client(base, tokens["submitter"]) as sub, client(base, tokens["reviewer"]) as rev, \
            client(base, tokens["viewer"]) as viewer:
        job_ws = await submit(sub, f"Count. {marker_ws}", "steer_ws", spec)
        job_http = await submit(sub, f"Count. {marker_http}", "steer_http", {**spec, "steerable": "reviewers"})
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
            room = await open_room(stack, tg, base, tokens["submitter"], job_ws)
            spy = await open_room(stack, tg, base, tokens["viewer"], job_ws)
            rev_room = await open_room(stack, tg, base, tokens["reviewer"], job_ws)
            room_http = await open_room(stack, tg, base, tokens["viewer"], job_http)

            # Mid-run: the first step is done, the model is "thinking" about the second.
            await room.wait_for(is_event("step", state="ok"), 60)
            await room_http.wait_for(is_event("step", state="ok"), 60)

            # Viewers never steer; reviewers only when the submitter allowed it.
            await send(spy.ws, type="steer", roomId=f"job:{job_ws}", requestId="v1", text=STEER_TEXT)
            assert (await spy.wait_for(is_reply("v1")))["code"] == "forbidden"
            await send(rev_room.ws, type="steer", roomId=f"job:{job_ws}", requestId="r1", text=STEER_TEXT)
            assert (await rev_room.wait_for(is_reply("r1")))["code"] == "forbidden"
            resp = await viewer.post(f"/api/jobs/{job_http}/instructions", json={"text": STEER_TEXT},
                                     headers={"Idempotency-Key": "v-http"})
            assert resp.status_code == 403, resp.text

            # The submitter over the WebSocket, sent twice with one request id.
            await send(room.ws, type="steer", roomId=f"job:{job_ws}", requestId="s1", text=STEER_TEXT)
            await send(room.ws, type="steer", roomId=f"job:{job_ws}", requestId="s1", text=STEER_TEXT)
            # A reviewer over HTTP on the job submitted steerable by reviewers; retried.
            key = uuid.uuid4().hex

            async def http_twice() -> list[httpx.Response]:
                first = await rev.post(f"/api/jobs/{job_http}/instructions", json={"text": STEER_TEXT},
                                       headers={"Idempotency-Key": key})
                again = await rev.post(f"/api/jobs/{job_http}/instructions", json={"text": STEER_TEXT},
                                       headers={"Idempotency-Key": key})
                return [first, again]

            http_replies: list[httpx.Response] = []

            async def run_http() -> None:
                http_replies.extend(await http_twice())

            tg.start_soon(run_http)
            ack = await room.wait_for(is_reply("s1"))
            assert ack["type"] == "ack", ack
            delivered = (await room.wait_for(is_event("instruction", requestId="s1", state="delivered")))["data"]
            await room.ended()
            await room_http.ended()
            with anyio.fail_after(30):
                while len(http_replies) < 2:
                    await anyio.sleep(0.1)
            # Both acks of the duplicate: the same event.
            acks = [m for m in room.seen if m.get("type") == "ack" and m.get("requestId") == "s1"]
            tg.cancel_scope.cancel()

        # ack only after the CLI's echo: its id is the `delivered` event, which
        # the worker publishes when it reads the echo.
        ids = [m["id"] for m in room.seen if m.get("type") == "event" and m.get("kind") == "instruction"
               and m["data"]["state"] == "delivered"]
        assert ids == [ack["id"]] and {a["id"] for a in acks} == {ack["id"]} and len(acks) == 2
        assert delivered["by"].startswith("submitter-") and delivered["text"] == STEER_TEXT
        states = [d["state"] for d in room.events("instruction")]
        assert states == ["queued", "delivered"], states
        # Every watcher sees it, viewers too.
        assert [d["state"] for d in spy.events("instruction")] == ["queued", "delivered"]
        stdout = [json.loads(ln) for ln in (tmp_path / "stdout" / f"{job_ws}.1.jsonl").read_text().splitlines()]
        echoed = [ln for ln in stdout if ln.get("type") == "user" and ln.get("isReplay")
                  and ln["message"]["content"] == STEER_TEXT]
        assert len(echoed) == 1, "the CLI took the instruction once"

        # The next model request held it, and the run followed the script's branch.
        for job_name in ("steer_ws", "steer_http"):
            steered = model_server.messages_for(f"{job_name}#{KEYWORD}")
            assert steered, f"{job_name}: no request held the instruction"
            text = json.dumps(steered[0].body["messages"])
            assert text.count(KEYWORD) == 1
        final = room.events("status")[-1]
        assert final["status"] == "succeeded"
        assert (workspace / "steer_ws" / "NOTES.md").read_text().strip() == "steered"
        assert (workspace / "steer_http" / "NOTES.md").read_text().strip() == "steered"

        first, again = http_replies
        assert first.status_code == 200 and first.json()["state"] == "delivered", first.text
        assert again.status_code == 200 and again.json() == first.json()
        assert [d["state"] for d in room_http.events("instruction")] == ["queued", "delivered"]

        # The job has ended: refused with a clear code, nothing sent.
        resp = await sub.post(f"/api/jobs/{job_ws}/instructions", json={"text": "too late"},
                              headers={"Idempotency-Key": "late"})
        assert resp.status_code == 409 and "not_running" in resp.text, resp.text
        async with connect(base) as ws:
            await auth(ws, tokens["submitter"])
            await join(ws, job_ws)
            await send(ws, type="steer", roomId=f"job:{job_ws}", requestId="late2", text="too late")
            err = await recv_type(ws, "error", timeout=10)
            assert err["code"] == "not_running" and err["requestId"] == "late2"

    records = await audit_records(settings, "job.instruct")
    audited = sorted(r.detail["requestId"] for r in records)
    assert audited == sorted(["s1", key]), audited


async def test_permission_prompts_are_answered_from_the_room(service, model_server, workspace, tmp_path) -> None:
    """permissionMode ask: allow runs the tool, deny reaches the CLI, no answer expires; first answer wins."""
    base, tokens, settings = service
    spec = {"permissionMode": "ask", "steerable": "reviewers"}
    names = ("ask_allow", "ask_deny", "ask_expire")
    markers = {}
    for name in names:
        steer_repo(workspace, name)
        markers[name] = model_server.script(
            name, [reply(ToolUse("Bash", {"command": f"touch {name}.done", "description": "Touch"}))],
            final=f"{name} finished.",
        )
    async with client(base, tokens["submitter"]) as sub, client(base, tokens["viewer"]) as viewer, \
            contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
        jobs = {name: await submit(sub, f"Touch a file. {markers[name]}", name, spec) for name in names}
        rooms = {name: await open_room(stack, tg, base, tokens["reviewer"], jobs[name]) for name in names}
        spy = await open_room(stack, tg, base, tokens["viewer"], jobs["ask_allow"])
        pending = {
            name: (await rooms[name].wait_for(is_event("permission", state="pending"), 60))["data"] for name in names
        }
        for name in names:
            assert pending[name]["tool"] == "Bash" and pending[name]["input"]["command"] == f"touch {name}.done"

        # Viewers may not answer.
        allow_id = pending["ask_allow"]["permissionId"]
        await send(spy.ws, type="decide", roomId=f"job:{jobs['ask_allow']}", requestId="v", permissionId=allow_id, allow=True)
        assert (await spy.wait_for(is_reply("v")))["code"] == "forbidden"
        resp = await viewer.post(f"/api/jobs/{jobs['ask_allow']}/permissions/{allow_id}", json={"allow": True},
                                 headers={"Idempotency-Key": "v2"})
        assert resp.status_code == 403, resp.text

        # A reviewer (the job is steerable by reviewers) allows over the WebSocket.
        room = rooms["ask_allow"]
        await send(room.ws, type="decide", roomId=f"job:{jobs['ask_allow']}", requestId="a1", permissionId=allow_id, allow=True)
        ack = await room.wait_for(is_reply("a1"))
        assert ack["type"] == "ack", ack
        # The first answer won: a second one is told so.
        await send(room.ws, type="decide", roomId=f"job:{jobs['ask_allow']}", requestId="a2", permissionId=allow_id, allow=False)
        assert (await room.wait_for(is_reply("a2")))["code"] == "already_decided"

        # The submitter denies from the terminal, with a message for the agent,
        # using the command `watch` prints with the prompt.
        deny_id = pending["ask_deny"]["permissionId"]
        line = format_event(EventMsg(roomId="", id="1-0", kind="permission", at=0, data=pending["ask_deny"]), jobs["ask_deny"])
        command = line.split("answer: ", 1)[1].replace("allow|deny", "deny").split()
        assert command[:2] == ["progress-service", "decide"]
        done = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "progress_service.cli", *command[1:], "--message", "Do not touch files today.",
             "--url", base, "--token", tokens["submitter"]],
            capture_output=True, text=True, timeout=90,
        ))
        assert done.returncode == 0, done.stderr
        assert "denied" in done.stderr and done.stdout.strip()

        finals = {name: (await rooms[name].ended())["data"] for name in names}
        tg.cancel_scope.cancel()

    outcomes = {name: [d["state"] for d in rooms[name].events("permission")] for name in names}
    assert outcomes == {"ask_allow": ["pending", "allowed"], "ask_deny": ["pending", "denied"], "ask_expire": ["pending", "expired"]}
    assert [m["id"] for m in rooms["ask_allow"].seen if m.get("kind") == "permission"][-1] == ack["id"]
    assert [d["state"] for d in spy.events("permission")] == ["pending", "allowed"]  # everyone sees the outcome
    assert all(f["status"] == "succeeded" for f in finals.values()), finals
    # allow: the tool ran.
    assert (workspace / "ask_allow" / "ask_allow.done").exists()
    steps = [d for d in rooms["ask_allow"].events("step") if d["state"] != "started"]
    assert steps and steps[-1]["state"] == "ok"
    # deny and expiry: the tool did not run and the CLI reported the denial to the model.
    for name, said in (("ask_deny", "Do not touch files today."), ("ask_expire", f"no answer within {settings.permission_timeout:g}s")):
        assert not (workspace / name / f"{name}.done").exists()
        ended = [d for d in rooms[name].events("step") if d["state"] != "started"]
        assert ended and ended[-1]["state"] == "error", ended
        results = [
            b for r in model_server.messages_for(name) for m in r.body["messages"] if isinstance(m.get("content"), list)
            for b in m["content"] if b.get("type") == "tool_result"
        ]
        assert results and said in json.dumps(results[-1]), results[-1:]

    records = await audit_records(settings, "permission.decide")
    assert sorted((r.detail["permissionId"], r.detail["allow"]) for r in records) == sorted(
        [(allow_id, True), (deny_id, False)]
    )


async def test_refusals_without_a_live_cli(make_settings, make_token, live_server, redis) -> None:
    """A queued job is not running; a running job whose lease is gone has lost its worker; nothing is enqueued."""

    settings = make_settings()
    sub_token = await make_token(role="submitter")
    async with live_server(settings, run_worker=False) as base, client(base, sub_token) as sub:
        job_id = (await sub.post("/api/jobs", json={"prompt": "wait"})).json()["id"]
        resp = await sub.post(f"/api/jobs/{job_id}/instructions", json={"text": "go"}, headers={"Idempotency-Key": "q1"})
        assert resp.status_code == 409 and "not_running" in resp.json()["detail"], resp.text
        # As if a worker had claimed it and then died: running, no lease.
        await redis.hset(run_key(job_id), mapping={"state": "running", "attempt": 1, "worker": "w"})
        await redis.delete(lease_key(job_id))
        resp = await sub.post(f"/api/jobs/{job_id}/instructions", json={"text": "go"}, headers={"Idempotency-Key": "g1"})
        assert resp.status_code == 503 and "worker_gone" in resp.json()["detail"] and resp.headers["Retry-After"], resp.text
        resp = await sub.post(f"/api/jobs/{job_id}/permissions/p1", json={"allow": True}, headers={"Idempotency-Key": "g2"})
        assert resp.status_code == 404, resp.text  # no such prompt
        assert await redis.xlen(inbox_key(job_id)) == 0
        assert not await redis.hgetall(steer_key(job_id))
        # Bad input is a 400 naming the field, never a 500.
        resp = await sub.post(f"/api/jobs/{job_id}/instructions", json={"text": "  "}, headers={"Idempotency-Key": "b1"})
        assert resp.status_code == 400 and "text" in resp.text, resp.text
        resp = await sub.post(f"/api/jobs/{job_id}/instructions", json={"text": "x"})
        assert resp.status_code == 400 and "Idempotency-Key" in resp.text, resp.text
