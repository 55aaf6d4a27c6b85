"""The web page in real headless Chromium against a real server.

Each test starts ``progress-service serve`` and ``progress-service worker``
as subprocesses on a private Redis (so no other test's worker takes these
jobs), signs in the way a user does (the ``#token=`` link), and watches
demo jobs that the replay program plays at a raised speed. The restart test
stops the serve process mid-job and starts a new one on the same port.

Screenshots of the job page go to ``test-artifacts/`` (not committed).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from browser_helpers import (
    DESKTOP,
    PHONE,
    chromium,
    job_events,
    new_page,
    screenshot,
    sign_in_via_fragment,
    step_ids,
    submit_job,
)
from progress_service.embedded_redis import embedded_redis

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: The 4xx answers a test provokes on purpose show up as console errors.
HTTP_400 = r"Failed to load resource: the server responded with a status of 400"
HTTP_401 = r"Failed to load resource: the server responded with a status of 401"
#: While the server is down the browser logs its failed connections.
OUTAGE = (
    r"net::ERR_CONNECTION_REFUSED",
    r"WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed",
    r"Failed to load resource: net::ERR_",
)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of this module's own: its arq queue is not shared with other tests."""
    with embedded_redis() as url:
        yield url


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Any]:
    with chromium(chromium_path) as b:
        yield b


@pytest.fixture
def service(make_settings: Any, make_token: Any, server_process: Any, private_redis: str) -> Any:
    """``service(replay_speed=…)`` → (settings, serve process); a worker runs beside it."""

    def start(**overrides: Any) -> tuple[Any, Any]:
        settings = make_settings(redis_url=private_redis, **overrides)
        serve = server_process(settings, "serve")
        server_process(settings, "worker")
        return settings, serve

    return start


def token(make_token: Any, role: str, user: str) -> str:
    """An API token. Playwright's sync API runs an event loop in this thread: use another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make_token(role=role, user=user)).result()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect  # noqa: PLC0415

    return pw_expect(locator)


def dom_step_ids(page: Any) -> list[str]:
    return page.locator("#steps li.step").evaluate_all("els => els.map(e => e.dataset.stepId)")


# --------------------------------------------------------------------------


def test_sign_in_submit_and_watch_a_job_to_the_end(service: Any, make_token: Any, browser: Any) -> None:
    _, serve = service(replay_speed=4.0)
    submitter = token(make_token, "submitter", "sam")
    context, page, console = new_page(browser)

    # Without a token: the sign-in form. A wrong token is refused with a message.
    page.goto(serve.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    console.allow(HTTP_401)
    page.get_by_label("API token").fill("ps_not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#token-error")).to_contain_text("refused")

    # The link `progress-service dev` prints: the token is taken from the
    # fragment, kept in sessionStorage and removed from the address bar.
    sign_in_via_fragment(page, serve.url, submitter)
    assert "token" not in page.url and page.url.endswith("#/")
    assert page.evaluate("() => sessionStorage.getItem('progress-service.token')") == submitter
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # A bad request shows the server's message next to the form.
    console.allow(HTTP_400)
    page.get_by_label("Prompt").fill("Fix the rounding bug")
    page.get_by_label("Working directory").fill("../outside")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#submit-error")).to_contain_text("workdir")
    expect(page.locator("#job-workdir")).to_have_attribute("aria-invalid", "true")

    # A good one opens the job page, which follows the job live to the end.
    page.get_by_label("Working directory").fill("")
    page.get_by_label("Model").fill("sonnet")
    page.get_by_text("Limits and permissions").click()
    page.get_by_label("Max turns").fill("30")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".job-page")).to_be_visible()
    job_id = page.locator(".job-page").get_attribute("data-job-id")
    assert job_id and page.url.endswith(f"#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("Running", timeout=20_000)
    expect(page.locator("#job-progress")).to_have_attribute("data-percent", "100", timeout=60_000)
    expect(page.locator("#job-status")).to_have_text("Succeeded")
    expect(page.locator(".badge-demo").first).to_be_visible()  # a replay says so
    expect(page.locator(".banner-demo")).to_be_visible()
    expect(page.locator(".result-card")).to_contain_text("Finished")

    items = job_events(serve.url, submitter, job_id)
    expected_steps = step_ids(items)
    assert dom_step_ids(page) == expected_steps and len(expected_steps) >= 5
    assert page.locator("#steps li.step[data-state='started']").count() == 0
    todos = page.locator("#todos li.todo")
    expect(todos).to_have_count(3)
    expect(page.locator("#todos li.todo[data-state='completed']")).to_have_count(3)
    expect(page.locator(".phase[data-phase='editing']")).to_have_attribute("data-state", "done")
    assert page.locator(".stats").inner_text().count("$") == 1  # the cost is shown
    screenshot(page, "job-page-desktop.png")

    # Phone width: one column, nothing wider than the screen.
    page.set_viewport_size(PHONE)
    expect(page.locator("#job-progress")).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, "job-page-phone.png")
    page.set_viewport_size(DESKTOP)

    # Back to the list: the job is there with its final status and replay label.
    page.get_by_role("link", name="← All jobs").click()
    row = page.locator(f"li.job-row[data-job-id='{job_id}']")
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row.locator(".badge-demo")).to_be_visible()
    screenshot(page, "jobs-list-desktop.png")

    console.assert_clean()
    context.close()


def test_comments_presence_and_viewer(service: Any, make_token: Any, browser: Any) -> None:
    _, serve = service(replay_speed=4.0)
    alice = token(make_token, "reviewer", "alice")
    bob = token(make_token, "reviewer", "bob")
    carol = token(make_token, "viewer", "carol")
    submitter = token(make_token, "submitter", "sam")
    job = submit_job(serve.url, submitter, "Add a regression test for the parser")
    route = f"#/jobs/{job['id']}"

    ctx_a, page_a, console_a = new_page(browser)
    ctx_b, page_b, console_b = new_page(browser)
    sign_in_via_fragment(page_a, serve.url, alice, route)
    sign_in_via_fragment(page_b, serve.url, bob, route)

    # Presence: each page shows both watchers.
    for page in (page_a, page_b):
        people = page.locator(".presence-list li")
        expect(people).to_have_count(2, timeout=15_000)
        expect(page.locator(".presence-list")).to_contain_text("alice")
        expect(page.locator(".presence-list")).to_contain_text("bob")

    # Bob comments; it appears once in Alice's page, and is no longer pending in his.
    box = page_b.get_by_label("Add a comment")
    expect(box).to_be_enabled()
    box.fill("The new test covers the empty-input case too.")
    page_b.get_by_role("button", name="Comment").click()
    in_a = page_a.locator("li.comment", has_text="covers the empty-input case")
    expect(in_a).to_have_count(1, timeout=15_000)
    expect(in_a).to_have_attribute("data-state", "stored")
    expect(in_a.locator(".comment-author")).to_have_text("bob")
    mine = page_b.locator("li.comment", has_text="covers the empty-input case")
    expect(mine).to_have_count(1)
    expect(mine).to_have_attribute("data-state", "stored")

    # Alice answers; order is the room's order on both pages.
    page_a.get_by_label("Add a comment").fill("Agreed, ship it.")
    page_a.get_by_label("Add a comment").press("Control+Enter")
    for page in (page_a, page_b):
        texts = page.locator("li.comment[data-state='stored'] .comment-text")
        expect(texts).to_have_text(["The new test covers the empty-input case too.", "Agreed, ship it."], timeout=15_000)

    # A viewer reads everything but the comment box is disabled, with the reason.
    ctx_c, page_c, console_c = new_page(browser)
    sign_in_via_fragment(page_c, serve.url, carol, route)
    expect(page_c.locator("li.comment[data-state='stored']")).to_have_count(2, timeout=15_000)
    expect(page_c.get_by_label("Add a comment")).to_be_disabled()
    expect(page_c.get_by_role("button", name="Comment")).to_be_disabled()
    expect(page_c.locator("#comment-reason")).to_be_visible()
    expect(page_c.locator("#comment-reason")).to_contain_text("viewer")
    expect(page_c.locator("#cancel-job")).to_have_count(0)  # viewers cannot cancel either
    expect(page_a.locator(".presence-list li")).to_have_count(3)

    expect(page_a.locator("#job-progress")).to_have_attribute("data-percent", "100", timeout=60_000)
    screenshot(page_a, "job-page-with-comments.png")
    screenshot(page_c, "job-page-viewer.png")
    for console in (console_a, console_b, console_c):
        console.assert_clean()
    for ctx in (ctx_a, ctx_b, ctx_c):
        ctx.close()


def test_server_restart_mid_job_reconnects_and_loses_nothing(
    service: Any, make_token: Any, browser: Any, server_process: Any
) -> None:
    # The long transcript: ~300 tool calls over ~40 s at 1x; ~20 s at 2x.
    settings, serve = service(replay_speed=2.0)
    submitter = token(make_token, "submitter", "sam")
    job = submit_job(serve.url, submitter, "[long] refactor the parser")
    context, page, console = new_page(browser)
    sign_in_via_fragment(page, serve.url, submitter, f"#/jobs/{job['id']}")
    indicator = page.locator("#connection")
    expect(indicator).to_have_attribute("data-state", "live")
    expect(page.locator("#steps li.step")).not_to_have_count(0, timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("Running")

    # Stop the server (graceful: 1001), comment while it is away, start a new one.
    console.allow(*OUTAGE)
    serve.stop()
    expect(indicator).to_have_attribute("data-state", "reconnecting", timeout=10_000)
    expect(indicator).to_contain_text(re.compile(r"Reconnecting"))
    page.get_by_label("Add a comment").fill("Written while the server was away.")
    page.get_by_role("button", name="Comment").click()
    pending = page.locator("li.comment", has_text="while the server was away")
    expect(pending).to_have_attribute("data-state", "sending")
    screenshot(page, "job-page-reconnecting.png", full_page=False)
    server_process(settings, "serve", port=serve.port)

    # Back live; the comment is stored once (same requestId); the job ends.
    expect(indicator).to_have_attribute("data-state", "live", timeout=45_000)
    expect(indicator).to_have_text(re.compile("Live"))
    expect(pending).to_have_attribute("data-state", "stored", timeout=15_000)
    expect(page.locator("#job-status")).to_have_text("Succeeded", timeout=90_000)
    expect(page.locator("#job-progress")).to_have_attribute("data-percent", "100")

    items = job_events(serve.url, submitter, job["id"])
    expected = step_ids(items)
    shown = dom_step_ids(page)
    assert len(shown) == len(set(shown)), "a step is shown twice"
    assert shown == expected, f"{len(shown)} steps shown, {len(expected)} in the job"
    assert page.locator("#steps li.step[data-state='started']").count() == 0
    chats = [i for i in items if i["type"] == "chat" and "while the server was away" in i["text"]]
    assert len(chats) == 1
    expect(page.locator("li.comment", has_text="while the server was away")).to_have_count(1)
    screenshot(page, "job-page-after-restart.png")
    console.assert_clean()
    context.close()
