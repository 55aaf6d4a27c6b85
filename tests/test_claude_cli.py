"""The real Claude Code CLI in the loop: worker -> Redis -> gateway -> a WebSocket watcher.

The pinned CLI (``make claude``) talks to the scripted model server on
loopback and runs real tools in throwaway git repositories. Each job's raw
stdout is kept by the worker (``PS_CLAUDE_STDOUT_DIR``) and compared with
what the watcher received (``cli_watch.check_faithful``). Jobs of one test
run side by side on one worker, so the whole file takes seconds, not minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import cli_scenarios as sc
from cli_watch import Watched, check_faithful, job_processes, read_stdout, submit, watch
from model_server import DROP

pytestmark = pytest.mark.usefixtures("claude_env")


async def run_jobs(
    scenarios: list[sc.Scenario],
    *,
    claude_bin: str,
    model_server: Any,
    make_settings: Callable[..., Any],
    make_token: Callable[..., Any],
    live_server: Callable[..., Any],
    workspace: Path,
    tmp_path: Path,
    during: Callable[..., Any] | None = None,
    **settings_overrides: Any,
) -> dict[str, Watched]:
    """Submit every scenario at once, watch each to its end; returns name -> Watched.

    ``during(client, name, job_id)`` runs beside the watcher of each job
    (to cancel it at the right moment).
    """
    stdout_dir = tmp_path / "stdout"
    settings = make_settings(
        claude_bin=claude_bin, claude_stdout_dir=str(stdout_dir), worker_concurrency=len(scenarios),
        **settings_overrides,
    )
    token = await make_token(role="submitter")
    seen: dict[str, Watched] = {}
    async with live_server(settings) as base, httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:

        async def one(s: sc.Scenario) -> None:
            s.make_repo(workspace / s.name)
            job_id = await submit(client, s.install(model_server), s.name, s.spec)
            async with anyio.create_task_group() as tg:
                if during is not None:
                    tg.start_soon(during, client, s.name, job_id)
                seen[s.name] = read_stdout(stdout_dir, await watch(base, token, job_id))
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for s in scenarios:
                tg.start_soon(one, s)
    return seen


@pytest.fixture
def run(claude_bin, model_server, make_settings, make_token, live_server, workspace, tmp_path) -> Callable[..., Any]:
    async def go(scenarios: list[sc.Scenario], **kw: Any) -> dict[str, Watched]:
        return await run_jobs(
            scenarios, claude_bin=claude_bin, model_server=model_server, make_settings=make_settings,
            make_token=make_token, live_server=live_server, workspace=workspace, tmp_path=tmp_path, **kw,
        )

    return go


def phases(seen: Watched) -> list[str]:
    return [p["phase"] for p in seen.of("phase")]


async def test_real_jobs_are_shown_as_the_cli_printed_them(run: Any, workspace: Path) -> None:
    jobs = await run([
        sc.fix_bug("fix"), sc.subagent("survey"), sc.permission_denied("denied"),
        sc.max_turns("turns"), sc.bypass("bypass"),
    ])
    for seen in jobs.values():
        check_faithful(seen)

    fix = jobs["fix"]
    assert fix.final["status"] == "succeeded", fix.final
    assert "return sum(values) / len(values)\n" in (workspace / "fix" / "calc.py").read_text()
    assert [(s["tool"], s["state"]) for s in fix.of("step") if s["tool"] == "Bash" and s["state"] != "started"][0] == ("Bash", "ok")
    assert fix.of("todo")[-1]["done"] == fix.of("todo")[-1]["total"] == 3
    # Phases follow the work and never fall back to planning for a to-do update.
    ph = phases(fix)
    assert ph[:2] == ["starting", "planning"] and ph[-2:] == ["reviewing", "finishing"], ph
    assert "planning" not in ph[ph.index("editing"):], ph
    assert "testing" in ph
    # Output tokens count up during the run, before the result line.
    before_result = [u["outputTokens"] for u in fix.of("usage")[:-1]]
    assert len(set(before_result)) >= 5, before_result

    survey = jobs["survey"]
    assert survey.final["status"] == "succeeded", survey.final
    agent = next(s for s in survey.of("step") if s["tool"] == "Agent")
    nested = [s for s in survey.of("step") if s.get("parentStepId") == agent["stepId"]]
    assert {s["tool"] for s in nested} == {"Bash", "Read"}
    assert any("subagent completed" in n["text"] for n in survey.of("notice"))

    denied = jobs["denied"]
    assert denied.final["status"] == "succeeded"
    notice = next(n for n in denied.of("notice") if n["kind"] == "permission_denied")
    assert "rm -rf build" in notice["text"] and notice["stepId"] == denied.of("step")[-1]["stepId"]
    assert denied.of("step")[-1]["state"] == "error"

    turns = jobs["turns"]
    assert turns.final["status"] == "failed" and "Reached maximum number of turns (2)" in turns.final["reason"]

    # As root, without PS_CLAUDE_SANDBOX, the CLI refuses bypass mode on
    # stderr and prints no result: its reason is the job's reason.
    refused = jobs["bypass"]
    assert refused.final["status"] == "failed"
    assert "cannot be used with root/sudo privileges" in refused.final["reason"], refused.final


async def test_api_errors_retry_visibly_and_fail_with_their_text(
    run: Any, model_server: Any, monkeypatch: pytest.MonkeyPatch, workspace: Path
) -> None:
    # The other to-do tool and the sandboxed bypass ride along in this batch.
    monkeypatch.setenv("CLAUDE_CODE_ENABLE_TASKS", "0")
    jobs = await run([
        sc.api_errors("flaky", (529,)), sc.api_errors("unauthorized", (401, 401, 401)),
        sc.api_errors("offline", (DROP, DROP, DROP)), sc.todo_write("todos"), sc.bypass("sandboxed"),
    ], claude_sandbox=True)
    for seen in jobs.values():
        check_faithful(seen)

    flaky = jobs["flaky"]
    assert flaky.final["status"] == "succeeded"
    (retry,) = flaky.of("retry")
    assert retry["errorStatus"] == 529 and retry["text"].startswith("retrying the API (1/2, 529 overloaded, next in ")
    # Visible within a second of the failure the CLI is retrying.
    (failed_at,) = [r.at for r in model_server.messages_for("flaky") if r.status == 529]
    (shown_at,) = [t for t, e in flaky.events if e["kind"] == "retry"]
    assert shown_at - failed_at < 1.0, shown_at - failed_at

    unauthorized = jobs["unauthorized"]
    assert [r["attempt"] for r in unauthorized.of("retry")] == [1, 2]
    assert unauthorized.final["status"] == "failed" and "Invalid API key" in unauthorized.final["reason"]
    offline = jobs["offline"]
    assert [r.get("errorStatus") for r in offline.of("retry")] == [None, None]  # no HTTP answer at all
    assert offline.final["status"] == "failed" and offline.final["reason"], offline.final

    todos = jobs["todos"]
    assert todos.final["status"] == "succeeded"
    assert [t["done"] for t in todos.of("todo")] == [0, 1, 2]
    assert (workspace / "todos" / "NOTES.md").exists()

    sandboxed = jobs["sandboxed"]
    assert sandboxed.final["status"] == "succeeded", sandboxed.final
    assert (workspace / "sandboxed" / "bypassed").exists()


async def test_cancel_and_timeout_leave_no_process(run: Any, model_server: Any) -> None:
    marker = f"ANTHROPIC_BASE_URL={model_server.url}"

    async def cancel_when_busy(client: httpx.AsyncClient, name: str, job_id: str) -> None:
        if name == "in-tool":
            # The sleep is running: the Bash tool's own process exists.
            with anyio.fail_after(60):
                while not any(b"time.sleep(300)" in _cmdline(p) for p in job_processes(marker)):
                    await anyio.sleep(0.1)
        elif name == "in-api":
            with anyio.fail_after(60):
                while not model_server.messages_for("in-api"):
                    await anyio.sleep(0.1)
            await anyio.sleep(0.5)  # inside the stall now
        else:
            return
        resp = await client.post(f"/api/jobs/{job_id}/cancel")
        assert resp.status_code in (200, 202), resp.text

    started = time.monotonic()
    jobs = await run(
        [sc.long_tool("in-tool"), sc.stalled("in-api"), sc.stalled("too-slow", timeoutSeconds=8)],
        during=cancel_when_busy,
    )
    assert time.monotonic() - started < 60
    assert jobs["in-tool"].final["status"] == "cancelled"
    assert jobs["in-api"].final["status"] == "cancelled"
    assert jobs["too-slow"].final["status"] == "failed" and "timed out after 8s" in jobs["too-slow"].final["reason"]
    # Both stopped while the CLI waited on the (stalled) API.
    assert model_server.messages_for("in-api") and model_server.messages_for("too-slow")
    # The Bash step the cancel interrupted ends, as the CLI reported it.
    for seen in jobs.values():
        check_faithful(seen)
    assert not job_processes(marker), [(p, _cmdline(p)) for p in job_processes(marker)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""
