"""Running real Claude Code jobs through the service and comparing both ends.

A job is submitted over HTTP, a WebSocket client watches its room until the
job ends, and the CLI's raw stdout (kept by the worker under
``PS_CLAUDE_STDOUT_DIR``) is read back. :func:`check_faithful` then compares
what the CLI printed with what the watcher received.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import websockets

from gateway_helpers import auth, connect, join

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Watched:
    """One job as the watcher saw it, and what the CLI printed."""

    job_id: str
    #: (receive time in epoch seconds, event message) in arrival order.
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    stdout: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for _, e in self.events if e["kind"] == kind]

    @property
    def final(self) -> dict[str, Any]:
        return self.of("status")[-1]

    def printed(self, type_: str, subtype: str | None = None) -> list[dict[str, Any]]:
        return [ln for ln in self.stdout if ln.get("type") == type_ and (subtype is None or ln.get("subtype") == subtype)]


async def submit(client: httpx.AsyncClient, prompt: str, workdir: str, spec: dict[str, Any]) -> str:
    resp = await client.post("/api/jobs", json={"prompt": prompt, "workdir": workdir, **spec})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def watch(base: str, token: str, job_id: str, *, timeout: float = 90.0) -> Watched:
    """Every event of the job's room until its terminal status."""
    seen = Watched(job_id=job_id)
    async with connect(base, max_queue=None) as ws:
        await auth(ws, token)
        await join(ws, job_id)
        with anyio.fail_after(timeout):
            while True:
                try:
                    raw = await ws.recv()
                except websockets.ConnectionClosed as exc:  # pragma: no cover - reported with context
                    raise AssertionError(f"watcher closed: {exc}") from exc
                now = time.time()
                msg = json.loads(raw)
                for m in msg if isinstance(msg, list) else [msg]:
                    if m.get("type") == "event" and m.get("roomId") == f"job:{job_id}":
                        seen.events.append((now, m))
                        if m["kind"] == "status" and m["data"]["status"] in TERMINAL:
                            return seen


def read_stdout(folder: Path, seen: Watched) -> Watched:
    """Attach the CLI's raw stdout (every attempt) to ``seen``."""
    for path in sorted(folder.glob(f"{seen.job_id}.*.jsonl")):
        seen.stdout += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return seen


def tool_calls(stdout: list[dict[str, Any]]) -> dict[str, tuple[str, str | None]]:
    """tool_use id -> (tool name, parent tool_use id) for every call the CLI printed."""
    calls: dict[str, tuple[str, str | None]] = {}
    for ln in stdout:
        if ln.get("type") == "assistant":
            for block in ln["message"].get("content") or []:
                if block.get("type") == "tool_use":
                    calls[block["id"]] = (block["name"], ln.get("parent_tool_use_id"))
    return calls


def tool_outcomes(stdout: list[dict[str, Any]]) -> dict[str, str]:
    """tool_use id -> "ok"/"error" as the CLI reported it (a background task: its notification)."""
    outcome: dict[str, str] = {}
    background = {ln["tool_use_id"] for ln in stdout if ln.get("subtype") == "task_started" and ln.get("is_backgrounded")}
    for ln in stdout:
        if ln.get("type") == "user" and isinstance(ln["message"].get("content"), list):
            for block in ln["message"]["content"]:
                if block.get("type") == "tool_result" and block["tool_use_id"] not in background:
                    outcome[block["tool_use_id"]] = "error" if block.get("is_error") else "ok"
        if ln.get("subtype") == "task_notification" and ln.get("tool_use_id") in background:
            outcome[ln["tool_use_id"]] = "ok" if ln.get("status") == "completed" else "error"
    return outcome


def printed_todos(stdout: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The to-do list as the CLI's own tool results report it (not as the mapper derives it)."""
    tasks: dict[str, list[str]] = {}
    todos: list[tuple[str, str]] | None = None
    for ln in stdout:
        result = ln.get("tool_use_result") if ln.get("type") == "user" else None
        if not isinstance(result, dict):
            continue
        if isinstance(result.get("task"), dict):
            tasks[str(result["task"]["id"])] = [result["task"]["subject"], "pending"]
        elif result.get("statusChange") and str(result.get("taskId")) in tasks:
            tasks[str(result["taskId"])][1] = result["statusChange"]["to"]
        elif isinstance(result.get("newTodos"), list):
            todos = [(t["content"], t["status"]) for t in result["newTodos"]]
    return todos if todos is not None else [(text, state) for text, state in tasks.values()]


def result_totals(result: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of the session per its result line (modelUsage: subagents included)."""
    models = (result.get("modelUsage") or {}).values()
    turn = result.get("usage") or {}
    inp = sum(m.get("inputTokens", 0) + m.get("cacheReadInputTokens", 0) + m.get("cacheCreationInputTokens", 0) for m in models)
    turn_in = sum(turn.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    return max(inp, turn_in), max(sum(m.get("outputTokens", 0) for m in models), turn.get("output_tokens", 0))


def check_faithful(seen: Watched) -> None:
    """What the CLI printed is what the watcher got: steps, to-dos, tokens, cost, errors."""
    final = seen.final
    stopped = final["status"] == "cancelled" or (final.get("reason") or "").startswith("timed out")
    if not seen.stdout:
        # The CLI printed nothing: stopped before its first line, or it
        # refused to start, and then the job says why.
        assert stopped or (final["status"] == "failed" and "no result: " in final["reason"]), final
        assert not seen.of("step")
        return
    calls, outcomes = tool_calls(seen.stdout), tool_outcomes(seen.stdout)
    steps: dict[str, dict[str, Any]] = {}
    for step in seen.of("step"):
        steps[step["stepId"]] = step  # the last state wins
    assert set(steps) == set(calls), (sorted(steps), sorted(calls))
    for step_id, (tool, parent) in calls.items():
        step = steps[step_id]
        assert step["tool"] == tool and step.get("parentStepId") == parent, (step, tool, parent)
        assert step["state"] == outcomes.get(step_id, "started"), (step, outcomes.get(step_id))
    todos = seen.of("todo")
    expected = printed_todos(seen.stdout)
    if expected:
        assert [(i["text"], i["state"]) for i in todos[-1]["items"]] == expected
    results = seen.printed("result")
    if results:
        last = results[-1]
        usage = seen.of("usage")[-1]
        assert (usage["inputTokens"], usage["outputTokens"]) == result_totals(last)
        assert usage["costUsd"] == last["total_cost_usd"]
        if last.get("is_error") and not stopped:  # (a stopped CLI's own error is only the echo of the stop)
            # The error text of every failure is shown, not just a subtype.
            assert final["status"] == "failed", final
            for cause in [last.get("result"), *(last.get("errors") or [])]:
                if cause and cause.strip():
                    assert cause.strip()[:200] in (final.get("reason") or ""), (cause, final)
    # Tokens count up while the job runs, never down.
    live = [u["outputTokens"] for u in seen.of("usage")]
    assert live == sorted(live), live


def job_processes(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``marker`` (the test's model server URL)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found
