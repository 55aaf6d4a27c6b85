"""The page steers a running job: a reviewer allows Claude's pending tool use and the step runs.

Real Chromium, ``progress-service serve`` and ``worker`` subprocesses on a
private Redis, the pinned Claude Code CLI against the scripted model server.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import cli_scenarios as sc
from browser_helpers import chromium, new_page, screenshot, sign_in_via_fragment, submit_job
from model_server import ToolUse, reply
from progress_service.embedded_redis import embedded_redis

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("claude_env")]


def token(make_token: Any, role: str, user: str) -> str:
    """An API token (Playwright's sync API runs an event loop in this thread: use another)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make_token(role=role, user=user)).result()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect  # noqa: PLC0415

    return pw_expect(locator)


def test_reviewer_allows_a_pending_tool_use_from_the_page(
    claude_bin: str, model_server: Any, make_settings: Any, make_token: Any, server_process: Any,
    chromium_path: str, workspace: Path,
) -> None:
    with embedded_redis() as redis_url:
        settings = make_settings(redis_url=redis_url, claude_bin=claude_bin)
        serve = server_process(settings, "serve")
        server_process(settings, "worker")
        submitter = token(make_token, "submitter", "sam")
        reviewer = token(make_token, "reviewer", "rita")
        viewer = token(make_token, "viewer", "vic")
        sc.Scenario(name="page_ask", prompt="", turns=[]).make_repo(workspace / "page_ask")
        marker = model_server.script(
            "page_ask", [reply(ToolUse("Bash", {"command": "touch from-the-page", "description": "Touch"}))],
            final="Touched the file.",
        )
        job = submit_job(
            serve.url, submitter, f"Touch a file. {marker}", workdir="page_ask", permissionMode="ask", steerable="reviewers"
        )
        route = f"#/jobs/{job['id']}"
        with chromium(chromium_path) as browser:
            ctx_r, page_r, console_r = new_page(browser)
            ctx_v, page_v, console_v = new_page(browser)
            sign_in_via_fragment(page_r, serve.url, reviewer, route)
            sign_in_via_fragment(page_v, serve.url, viewer, route)

            # The prompt, with Allow / Deny for the reviewer only; everyone sees it.
            prompt_r = page_r.locator(".permission[data-state='pending']")
            expect(prompt_r).to_have_count(1, timeout=60_000)
            expect(prompt_r.locator(".permission-input")).to_have_text("touch from-the-page")
            prompt_v = page_v.locator(".permission[data-state='pending']")
            expect(prompt_v).to_have_count(1, timeout=15_000)
            expect(prompt_v.get_by_role("button", name="Allow")).to_be_hidden()
            # The reviewer may also send text to Claude; the viewer may not.
            expect(page_r.get_by_label("Send to Claude")).to_be_visible()
            expect(page_v.get_by_label("Send to Claude")).to_be_hidden()
            assert not (workspace / "page_ask" / "from-the-page").exists()
            screenshot(page_r, "job-page-permission-pending.png")

            # An instruction from the comment box, while Claude waits for the answer.
            page_r.get_by_label("Send to Claude").check()
            page_r.get_by_label("Add a comment").fill("Say which file you touched.")
            page_r.get_by_role("button", name="Send to Claude").click()
            expect(page_r.locator(".instruction")).to_contain_text("Say which file you touched.")

            prompt_r.get_by_role("button", name="Allow").click()
            for page in (page_r, page_v):
                done = page.locator(".permission[data-state='allowed']")
                expect(done).to_have_count(1, timeout=30_000)
                expect(done.locator(".permission-state")).to_contain_text("allowed by rita")
            # The instruction reached Claude (echoed by the CLI): everyone sees it delivered.
            for page in (page_r, page_v):
                expect(page.locator(".instruction[data-state='delivered']")).to_contain_text(
                    "Say which file you touched.", timeout=30_000
                )
            assert page_r.locator("li.comment").count() == 0  # sent to Claude, not posted as a comment
            # The step then runs, and the job ends well.
            expect(page_r.locator("#steps li.step[data-state='ok']")).to_have_count(1, timeout=30_000)
            expect(page_r.locator("#job-status")).to_have_text("Succeeded", timeout=60_000)
            assert (workspace / "page_ask" / "from-the-page").exists()
            screenshot(page_r, "job-page-permission-allowed.png")
            console_r.assert_clean()
            console_v.assert_clean()
            ctx_r.close()
            ctx_v.close()
