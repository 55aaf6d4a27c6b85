"""The real Claude Code CLI, with hooks installed by ``progress-service hooks install``, watched live.

A temporary project gets the settings block from the real command; the
pinned CLI runs a scripted conversation against the model server with
``PS_HOOK_TOKEN`` set to a reporter token; a reviewer's WebSocket joins the
session's room as soon as it appears and must see what the CLI's own
stream-json output says happened: the prompt, every tool call with its
outcome (including a subagent's, nested under it), the to-dos and the end.
"""

from __future__ import annotations

import contextlib

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
from gateway_helpers import auth, collect_events, connect, join, recv, send, serve
from hook_helpers import bearer, events, settled
from model_server import ToolUse, reply

ROOT = Path(__file__).resolve().parent.parent


def tool_calls(lines: list[dict[str, Any]]) -> dict[str, tuple[str, bool, str | None]]:
    """tool_use id -> (tool name, ended in error, parent tool_use id) from stream-json lines."""
    calls: dict[str, list[Any]] = {}
    for line in lines:
        content = (line.get("message") or {}).get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if line["type"] == "assistant" and block.get("type") == "tool_use":
                calls[block["id"]] = [block["name"], None, line.get("parent_tool_use_id")]
            elif line["type"] == "user" and block.get("type") == "tool_result" and block["tool_use_id"] in calls:
                calls[block["tool_use_id"]][1] = bool(block.get("is_error"))
    return {k: (v[0], v[1], v[2]) for k, v in calls.items()}


async def test_real_cli_session_is_watched_through_hooks(
    claude_bin: str, model_server: Any, claude_env: dict[str, str], store: Any, make_settings: Any, tmp_path: Path
) -> None:
    reporter = await store.token(role="reporter", team="t1", user="ci-runner")
    reviewer = await store.token(role="reviewer", team="t1", user="rita")
    project = tmp_path / "project"
    project.mkdir()
    sub = model_server.script("hook-sub", [reply(ToolUse("Bash", {"command": "echo from-the-subagent", "description": "look"}))], final="The subagent looked.")
    marker = model_server.script("hooked", [
        reply("Planning.", ToolUse("TaskCreate", {"subject": "Say hello", "description": "Print a greeting", "activeForm": "Saying hello"})),
        reply(ToolUse("TaskUpdate", {"taskId": "1", "status": "in_progress"})),
        reply(ToolUse("Bash", {"command": "echo hello-from-hooks", "description": "greet"})),
        reply(ToolUse("Bash", {"command": "exit 3", "description": "fail on purpose"})),
        reply(ToolUse("Agent", {"description": "look around", "prompt": f"{sub} look around", "subagent_type": "general-purpose"})),
        reply(ToolUse("TaskUpdate", {"taskId": "1", "status": "completed"})),
    ], final="All done: said hello.")
    prompt = f"Say hello with tasks {marker}"

    async with serve(make_settings()) as (base, _app), httpx.AsyncClient(base_url=base) as client:
        installed = subprocess.run(
            [sys.executable, "-m", "progress_service.cli", "hooks", "install", "--project", str(project), "--url", base, "--host-label", "ci-box"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        assert installed.returncode == 0, installed.stderr
        assert reporter not in (project / ".claude" / "settings.json").read_text()

        env = {"PATH": "/usr/bin:/bin", **claude_env, "PS_HOOK_TOKEN": reporter}
        argv = [claude_bin, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--allowedTools", "Bash", "TaskCreate", "TaskUpdate", "Agent"]
        async with await anyio.open_process(argv, cwd=project, env=env) as proc, contextlib.AsyncExitStack() as stack:
            out = bytearray()

            async def read_stdout() -> None:
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    out.extend(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_stdout)
                # The session appears with its first hook: join its room while it runs.
                with anyio.fail_after(60):
                    while True:
                        jobs = (await client.get("/api/jobs", headers=bearer(reviewer))).json()["items"]
                        if jobs:
                            break
                        await anyio.sleep(0.02)
                job = jobs[0]
                assert job["kind"] == "session" and job["session"]["host"] == "ci-box"
                assert job["session"]["cwd"] == str(project)
                # Connected only now: the gateway closes a connection that has
                # not authenticated within its auth timeout (5 s), and the
                # CLI's first hook can take longer than that on a busy machine.
                ws = await stack.enter_async_context(connect(base, max_queue=None))
                await auth(ws, reviewer)
                await join(ws, job["id"])
                with anyio.fail_after(60):
                    code = await proc.wait()
            assert code == 0
            # Every hook the CLI sent was answered before it exited: once they
            # are applied, the record is complete, and the watcher must see
            # all of it, in order.
            await settled(_app)
            record = await events(client, reviewer, job["id"])
            seen: list[dict[str, Any]] = []
            with anyio.fail_after(60):
                while len([e for e in seen if e.get("type") == "event"]) < len(record):
                    seen += await collect_events(ws, 1, timeout=60)
            assert [(e["kind"], e["data"]) for e in seen] == [(e["kind"], e["data"]) for e in record]
            await send(ws, type="chat", roomId=job["roomId"], requestId="r1", text="watched it all")
            # The ack and the room's copy of the comment, in either order.
            got: dict[str, dict[str, Any]] = {}
            with anyio.fail_after(10):
                while len(got) < 2:
                    msg = await recv(ws)
                    for m in msg if isinstance(msg, list) else [msg]:
                        if m.get("type") in ("ack", "chat"):
                            got[m["type"]] = m
            assert got["ack"]["requestId"] == "r1" and got["ack"]["id"] == got["chat"]["id"]
            assert got["chat"]["text"] == "watched it all" and got["chat"]["userName"] == "rita"
    lines = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
    assert lines[-1]["type"] == "result" and lines[-1]["is_error"] is False
    session_id = lines[0]["session_id"]
    assert job["session"]["sessionId"] == session_id

    # The prompt, as the CLI was given it. The CLI may also report the
    # finished subagent back to itself as a prompt of its own and answer it
    # (seen in CI, timing-dependent): that is a notice, not the user's turn.
    assert [e["data"] for e in seen if e["kind"] == "turn"] == [{"turn": 1, "prompt": prompt}]
    wakes = [e["data"] for e in seen if e["kind"] == "notice" and e["data"]["text"].startswith('Agent "look around"')]
    assert len(wakes) <= 1
    # Every tool call of the stream-json output is a step: started, then its outcome.
    calls = tool_calls(lines)
    assert len(calls) == 7
    step_events = [e["data"] for e in seen if e["kind"] == "step"]
    for tool_id, (tool, failed, _parent) in calls.items():
        states = [d["state"] for d in step_events if d["stepId"] == tool_id]
        assert states == ["started", "error" if failed else "ok"], (tool, states)
        assert {d["tool"] for d in step_events if d["stepId"] == tool_id} == {tool}
    assert [calls[d["stepId"]][1] for d in step_events if d["state"] == "error"] == [True]
    # Opened, a step shows what the tool was asked and what it answered.
    echo = next(d for d in step_events if d.get("input", {}).get("command") == "echo hello-from-hooks")
    echo_done = next(d for d in step_events if d["stepId"] == echo["stepId"] and d["state"] == "ok")
    assert "hello-from-hooks" in echo_done["output"] and echo_done["exitCode"] == 0
    failed = next(d for d in step_events if d["state"] == "error")
    assert failed["exitCode"] == 3 and failed["error"]
    # The subagent nests under its Agent call, and its tool call under the subagent.
    agent_call = next(i for i, c in calls.items() if c[0] == "Agent")
    sub_call = next(i for i, c in calls.items() if c[2] == agent_call)
    subagent = next(d for d in step_events if d["tool"] == "Subagent" and d["state"] == "started")
    assert subagent["parentStepId"] == agent_call
    assert next(d for d in step_events if d["stepId"] == sub_call)["parentStepId"] == subagent["stepId"]
    # The to-dos, and the end.
    todos = [e["data"] for e in seen if e["kind"] == "todo"]
    assert todos[0]["items"] == [{"text": "Say hello", "state": "pending"}]
    assert todos[-1] == {"items": [{"text": "Say hello", "state": "completed"}], "done": 1, "total": 1}
    assert [e["data"]["text"] for e in seen if e["kind"] == "message"][-1] == lines[-1]["result"]
    # One round, or two when the CLI answered its subagent's report after the turn had ended.
    statuses = [e["data"]["status"] for e in seen if e["kind"] == "status"]
    assert statuses in (["running", "succeeded"], ["running", "succeeded", "running", "succeeded"])
    assert len(statuses) == 2 or wakes
