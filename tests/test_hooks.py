"""POST /api/hooks/claude-code against the real app: mapping, idempotency, order, hostile bodies, roles."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import httpx
from gateway_helpers import auth, closed_with, collect_events, connect, join, recv_type, send, serve
from hook_helpers import HOOK_PATH, Session, bearer, events, post_hook, settled, steps, wait_snapshot

ROOT = Path(__file__).resolve().parent.parent
TODOS = [
    {"content": "Read the code", "status": "completed", "activeForm": "Reading"},
    {"content": "Fix the bug", "status": "in_progress", "activeForm": "Fixing"},
]


async def test_a_session_becomes_a_watchable_job(store, make_settings) -> None:
    reporter = await store.token(role="reporter", team="t1", user="laptop-reporter")
    reviewer = await store.token(role="reviewer", team="t1")
    admin = await store.token(role="admin", team="t1")
    s = Session()
    async with serve(make_settings()) as (base, app), httpx.AsyncClient(base_url=base) as client:
        answers = [await post_hook(client, reporter, s.body("SessionStart", source="startup", model="claude-sonnet"))]
        await wait_snapshot(client, admin, s.job_id, lambda snap: snap["status"] == "running")
        async with connect(base, max_queue=None) as ws:
            await auth(ws, reviewer)
            joined = await join(ws, s.job_id)
            assert joined["snapshot"]["kind"] == "session"
            assert joined["snapshot"]["session"]["host"] == "laptop-1"
            assert joined["snapshot"]["session"]["cwd"] == "/home/dev/project"
            sent = [
                s.body("UserPromptSubmit", prompt="Fix the failing test"),
                s.body("UserPromptSubmit", prompt="Fix the failing test"),  # a retried delivery
                s.pre("t1", "TodoWrite", {"todos": TODOS}),
                s.post("t1", "TodoWrite", {"todos": TODOS}),
                s.pre("t2", "Bash", {"command": "pytest -q"}),
                s.pre("t2", "Bash", {"command": "pytest -q"}),  # duplicate
                s.fail("t2", "Bash", {"command": "pytest -q"}, "1 failed"),
                # The PostToolUse overtakes its PreToolUse:
                s.post("t3", "Read", {"file_path": "/home/dev/project/app.py"}),
                s.pre("t3", "Read", {"file_path": "/home/dev/project/app.py"}),
                s.body("TaskCreated", task_id="7", task_subject="Write a regression test"),
                s.body("SubagentStart", agent_id="a1", agent_type="Explore"),
                s.pre("t4", "Grep", {"pattern": "def handler"}, agent_id="a1", agent_type="Explore"),
                s.post("t4", "Grep", {"pattern": "def handler"}, agent_id="a1", agent_type="Explore"),
                s.body("SubagentStop", agent_id="a1", agent_type="Explore", stop_hook_active=False),
                s.body("TaskCompleted", task_id="7", task_subject="Write a regression test"),
                s.body("Notification", message="Claude needs your permission", notification_type="permission_prompt"),
                s.body("Stop", stop_hook_active=False, last_assistant_message="Fixed: the test passes now."),
                s.body("Stop", stop_hook_active=False, last_assistant_message="Fixed: the test passes now."),
            ]
            for body in sent:
                t0 = time.perf_counter()
                answers.append(await post_hook(client, reporter, body))
                # A hook blocks the session until it is answered. The figure is
                # measured in bench/ (docs/performance.md); this bound only
                # catches an answer that waits for something it must not (the
                # CLI's own hook timeout is 5 s), also on a machine whose two
                # cores are saturated by other runs.
                assert time.perf_counter() - t0 < 3.0
            seen = []
            while not any(e["kind"] == "status" and e["data"]["status"] == "succeeded" for e in seen):
                seen += await collect_events(ws, 1)
            # Comments work in the session's room.
            await send(ws, type="chat", roomId=f"job:{s.job_id}", requestId="c1", text="nice fix")
            ack = await recv_type(ws, "ack")
            assert ack["requestId"] == "c1"
        for resp in answers:
            assert resp.status_code == 204, resp.text
            assert resp.content == b""

        turns = [e["data"] for e in seen if e["kind"] == "turn"]
        assert turns == [{"turn": 1, "prompt": "Fix the failing test"}]
        assert steps(seen) == [
            ("t1", "started"), ("t1", "ok"),
            ("t2", "started"), ("t2", "error"),
            ("t3", "started"), ("t3", "ok"),
            ("agent-a1", "started"), ("t4", "started"), ("t4", "ok"), ("agent-a1", "ok"),
        ]
        by_id = {e["data"]["stepId"]: e["data"] for e in seen if e["kind"] == "step" and e["data"]["state"] != "started"}
        assert by_id["t2"]["tool"] == "Bash" and by_id["t2"]["title"] == "pytest -q"
        assert by_id["t2"]["durationMs"] >= 0
        assert by_id["t2"]["error"] == "1 failed" and by_id["t3"]["output"] == "ok"
        assert next(e for e in seen if e["kind"] == "step")["data"]["input"]["text"]  # the TodoWrite list
        assert by_id["t4"]["parentStepId"] == "agent-a1"
        todos = [e["data"] for e in seen if e["kind"] == "todo"]
        assert todos[0]["items"] == [{"text": "Read the code", "state": "completed"}, {"text": "Fix the bug", "state": "in_progress"}]
        assert todos[-1]["items"][-1] == {"text": "Write a regression test", "state": "completed"}
        assert todos[-1]["done"] == 2 and todos[-1]["total"] == 3
        assert any(e["kind"] == "log" and e["data"]["stream"] == "notification" for e in seen)
        assert [e["data"]["text"] for e in seen if e["kind"] == "message"] == ["Fixed: the test passes now."]
        assert [e["data"]["status"] for e in seen if e["kind"] == "status"] == ["running", "succeeded"]  # one end despite two Stops

        # The job list says where it runs and that it was not started here.
        listed = (await client.get("/api/jobs", headers=bearer(admin))).json()["items"]
        mine = next(j for j in listed if j["id"] == s.job_id)
        assert mine["kind"] == "session" and mine["session"]["source"] == "hook"
        assert mine["session"]["host"] == "laptop-1" and mine["prompt"] == "Fix the failing test"
        # Cancel is refused with the reason.
        resp = await client.post(f"/api/jobs/{s.job_id}/cancel", headers=bearer(admin))
        assert resp.status_code == 409 and "laptop-1" in resp.json()["detail"]

        # A new prompt reopens the session; SessionEnd ends it for good, later hooks change nothing.
        await post_hook(client, reporter, s.body("UserPromptSubmit", prompt="Now add a changelog entry"))
        await post_hook(client, reporter, s.body("SessionEnd", reason="prompt_input_exit"))
        final = await wait_snapshot(client, admin, s.job_id, lambda snap: "session ended" in (snap["reason"] or ""))
        assert final["status"] == "succeeded" and final["session"]["turns"] == 2
        before = await events(client, admin, s.job_id)
        await post_hook(client, reporter, s.pre("t9", "Bash", {"command": "ls"}))
        await post_hook(client, reporter, s.body("SessionEnd", reason="prompt_input_exit"))
        await post_hook(client, reporter, s.body("Notification", message="after the end"))
        await settled(app)
        assert await events(client, admin, s.job_id) == before
        statuses = [e["data"]["status"] for e in before if e.get("kind") == "status"]
        assert statuses == ["running", "succeeded", "running", "succeeded"]


NOTIFICATION = """<task-notification>
<task-id>ab984e4eca9d975f3</task-id>
<tool-use-id>toolu_agent</tool-use-id>
<output-file>/tmp/claude-0/tasks/ab984e4eca9d975f3.output</output-file>
<status>completed</status>
<summary>Agent "look around" finished</summary>
<result>The subagent looked.</result>
</task-notification>"""


async def test_a_task_notification_prompt_is_a_notice_and_its_round_ends_with_its_stop(store, make_settings) -> None:
    # The real CLI (seen in CI) may submit a finished subagent's report as a
    # prompt of its own after the turn's Stop, then answer it and Stop again.
    reporter = await store.token(role="reporter", team="t1", user="laptop-reporter")
    admin = await store.token(role="admin", team="t1")
    s = Session()
    async with serve(make_settings()) as (base, app), httpx.AsyncClient(base_url=base) as client:
        for body in [
            s.body("SessionStart", source="startup"),
            s.body("UserPromptSubmit", prompt="Look around"),
            s.pre("toolu_agent", "Agent", {"description": "look around", "prompt": "look"}),
            s.post("toolu_agent", "Agent", {"description": "look around", "prompt": "look"}),
            s.body("Stop", stop_hook_active=False, last_assistant_message="Looked."),
            s.body("UserPromptSubmit", prompt=NOTIFICATION),
            s.body("UserPromptSubmit", prompt=NOTIFICATION),  # a retried delivery
            s.body("Stop", stop_hook_active=False, last_assistant_message="The subagent is done."),
            s.body("Stop", stop_hook_active=False, last_assistant_message="The subagent is done."),
        ]:
            assert (await post_hook(client, reporter, body)).status_code == 204
        await settled(app)
        seen = await events(client, admin, s.job_id)
        snap = await wait_snapshot(client, admin, s.job_id, lambda snap: snap["status"] == "succeeded")
    assert [e["data"] for e in seen if e["kind"] == "turn"] == [{"turn": 1, "prompt": "Look around"}]
    assert [e["data"] for e in seen if e["kind"] == "notice"] == [
        {"kind": "subagent", "text": 'Agent "look around" finished (completed)', "stepId": "toolu_agent"}
    ]
    assert [e["data"]["status"] for e in seen if e["kind"] == "status"] == ["running", "succeeded", "running", "succeeded"]
    assert [e["data"]["text"] for e in seen if e["kind"] == "message"] == ["Looked.", "The subagent is done."]
    assert snap["session"]["turns"] == 1 and snap["prompt"] == "Look around"


async def test_hostile_bodies_get_4xx_without_effect(store, make_settings) -> None:
    reporter = await store.token(role="reporter", team="t1")
    other_team = await store.token(role="reporter", team="t2")
    admin = await store.token(role="admin", team="t1")
    viewer = await store.token(role="viewer", team="t1")
    s = Session()
    settings = make_settings(hook_max_body_bytes=64 * 1024, hook_max_depth=16)
    async with serve(settings) as (base, app), httpx.AsyncClient(base_url=base) as client:
        assert (await post_hook(client, reporter, s.body("SessionStart", source="startup"))).status_code == 204
        await wait_snapshot(client, admin, s.job_id, lambda snap: snap["status"] == "running")
        before = await events(client, admin, s.job_id)

        deep: object = "x"
        for _ in range(40):
            deep = {"a": deep}
        very_deep = "[" * 30_000 + "]" * 30_000
        cases = {
            "huge": (s.pre("h1", "Write", {"file_path": "a", "content": "x" * 100_000}), 413),
            "over the app's limit": (b"{" + b" " * (3 << 20) + b"}", 413),
            "deep": (s.pre("h2", "Bash", {"command": "ls", "x": deep}), 400),
            "very deep unknown field": ('{"session_id":"%s","hook_event_name":"Stop","z":%s}' % (s.session_id, very_deep), 400),
            "not json": (b"{not json", 400),
            "not utf-8": (b'{"session_id":"\xff\xfe","hook_event_name":"Stop"}', 400),
            "an array": (b"[1,2,3]", 400),
            "wrong type": (s.body("UserPromptSubmit", prompt=["not", "a", "string"]), 400),
            "tool_input not an object": (s.body("PreToolUse", tool_name="Bash", tool_input="rm -rf /", tool_use_id="x"), 400),
            "session id not a string": ({**s.body("Stop"), "session_id": 12345}, 400),
            "session id with a newline": ({**s.body("Stop"), "session_id": "a\nb"}, 400),
            "no session id": ({"hook_event_name": "Stop"}, 400),
            "unknown event": (s.body("DropTables"), 400),
            "empty": (b"", 400),
            "null": (b"null", 400),
            "no event name": ({"session_id": s.session_id}, 400),
        }
        for name, (body, status) in cases.items():
            resp = await post_hook(client, reporter, body)
            assert resp.status_code == status, (name, resp.status_code, resp.text)
            detail = resp.json()["detail"]
            assert detail and "Traceback" not in detail, name

        # Another team's session id: refused, and nothing reaches the room.
        resp = await post_hook(client, other_team, s.body("UserPromptSubmit", prompt="hijack"))
        assert resp.status_code == 409 and "another team" in resp.json()["detail"]
        # Credentials: none, bad, or a role that is not a reporter.
        assert (await client.post(HOOK_PATH, json=s.body("Stop"))).status_code == 401
        assert (await post_hook(client, "ps_not-a-token", s.body("Stop"))).status_code == 401
        assert (await post_hook(client, viewer, s.body("Stop"))).status_code == 403
        # A marker the ingest must reach only after everything above.
        await post_hook(client, reporter, s.body("Notification", message="marker"))
        await settled(app)
        after = await events(client, admin, s.job_id)
        assert [e["data"].get("line") for e in after[len(before):]] == ["marker"]


async def test_a_reporter_token_reads_nothing(store, make_settings) -> None:
    reporter = await store.token(role="reporter", team="t1")
    admin = await store.token(role="admin", team="t1")
    s = Session()
    async with serve(make_settings()) as (base, _app), httpx.AsyncClient(base_url=base) as client:
        await post_hook(client, reporter, s.body("SessionStart", source="startup"))
        await wait_snapshot(client, admin, s.job_id, lambda snap: snap["status"] == "running")
        for method, path in [
            ("GET", "/api/jobs"),
            ("GET", f"/api/jobs/{s.job_id}"),
            ("GET", f"/api/jobs/{s.job_id}/events"),
            ("GET", f"/api/jobs/{s.job_id}/stream"),
            ("GET", f"/api/jobs/{s.job_id}/comments"),
            ("POST", f"/api/jobs/{s.job_id}/comments"),
            ("POST", f"/api/jobs/{s.job_id}/cancel"),
            ("POST", "/api/jobs"),
            ("POST", "/api/ws-tickets"),
            ("GET", "/api/me"),
            ("GET", "/api/audit"),
            ("GET", "/api/tokens"),
        ]:
            resp = await client.request(method, path, headers={**bearer(reporter), "Idempotency-Key": "k"}, json={"text": "x", "prompt": "x"})
            assert resp.status_code == 403, (method, path, resp.status_code, resp.text)
            assert "reporter" in resp.json()["detail"]
        # Nor can it become a web session (the cookie would read as the reporter).
        resp = await client.post("/api/session", json={"token": reporter})
        assert resp.status_code == 403 and "set-cookie" not in resp.headers
        async with connect(base) as ws:
            await send(ws, type="auth", token=reporter)
            assert await closed_with(ws) == (4403, "auth failed")


async def test_rate_limit_and_session_cap_per_token(store, make_settings) -> None:
    reporter = await store.token(role="reporter", team="t1")
    second = await store.token(role="reporter", team="t1")
    settings = make_settings(hook_rate=1.0, hook_burst=5, hook_max_sessions_per_hour=2)
    async with serve(settings) as (base, _app), httpx.AsyncClient(base_url=base) as client:
        s = Session()
        codes = [(await post_hook(client, reporter, s.body("Notification", message=f"n{i}"))).status_code for i in range(8)]
        assert codes[:5] == [204] * 5 and codes[5:] == [429] * 3
        resp = await post_hook(client, reporter, s.body("Notification", message="again"))
        assert resp.headers["retry-after"] == "1"
        # Another token has its own bucket, and at most 2 new sessions an hour.
        codes = [(await post_hook(client, second, Session().body("SessionStart", source="startup"))).status_code for _ in range(3)]
        assert codes == [204, 204, 429]


async def test_terminal_watch_sse_and_audit_work_on_a_session(store, make_settings) -> None:
    reporter = await store.token(role="reporter", team="t1", user="laptop")
    viewer = await store.token(role="viewer", team="t1")
    admin = await store.token(role="admin", team="t1")
    s = Session()
    async with serve(make_settings()) as (base, app), httpx.AsyncClient(base_url=base) as client:
        await post_hook(client, reporter, s.body("UserPromptSubmit", prompt="Tidy the README"))
        await post_hook(client, reporter, s.pre("w1", "Edit", {"file_path": "README.md", "old_string": "a", "new_string": "b"}))
        await settled(app)
        env = {"PATH": "/usr/bin:/bin", "PS_URL": base, "PS_TOKEN": viewer}
        async with await anyio.open_process(
            [sys.executable, "-m", "progress_service.cli", "watch", s.job_id, "--plain"], env=env, cwd=str(ROOT)
        ) as watcher:
            async with client.stream("GET", f"/api/jobs/{s.job_id}/stream", headers=bearer(viewer)) as sse:
                assert sse.status_code == 200
                await post_hook(client, reporter, s.post("w1", "Edit", {"file_path": "README.md", "old_string": "a", "new_string": "b"}))
                await post_hook(client, reporter, s.body("Stop", stop_hook_active=False, last_assistant_message="Tidied."))
                text = ""
                with anyio.fail_after(20):
                    async for chunk in sse.aiter_text():  # the stream ends once the session's turn ended
                        text += chunk
            assert watcher.stdout is not None
            out = b""
            with anyio.fail_after(30):
                async for chunk in watcher.stdout:
                    out += chunk
                code = await watcher.wait()
            lines = out.decode().splitlines()
        assert code == 0  # the turn succeeded
        assert any("prompt 1: Tidy the README" in line for line in lines), lines
        assert any("ok Edit README.md" in line for line in lines), lines
        assert "event: joined" in text and '"kind":"turn"' in text and '"status":"succeeded"' in text
        audit = (await client.get("/api/audit", params={"action": "session.report"}, headers=bearer(admin))).json()
        record = next(r for r in audit["items"] if r["roomId"] == f"job:{s.job_id}")
        assert record["actor"] == "laptop" and record["detail"]["sessionId"] == s.session_id
