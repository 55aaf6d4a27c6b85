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
import json
import re
import time
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


@pytest.fixture
def service_serve_only(make_settings: Any, server_process: Any, private_redis: str) -> Any:
    """``service_serve_only()`` → the serve process alone (jobs stay queued)."""

    def start(**overrides: Any) -> Any:
        return server_process(make_settings(redis_url=private_redis, **overrides), "serve")

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
    # fragment, exchanged for an HttpOnly cookie and removed from the address bar.
    sign_in_via_fragment(page, serve.url, submitter)
    assert "token" not in page.url and page.url.endswith("#/")
    assert submitter not in page.evaluate("() => document.cookie + JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
    assert any(c["name"] == "ps_session" and c["httpOnly"] for c in context.cookies())
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
    expect(page_c.locator("#whoami")).to_contain_text("carol")
    expect(page_c.locator("#whoami")).to_contain_text("(viewer)")
    expect(page_a.locator(".presence-list li")).to_have_count(3)

    expect(page_a.locator("#job-status")).to_have_text("Succeeded", timeout=60_000)
    expect(page_a.locator("#job-progress")).to_have_attribute("data-percent", "100")
    page_a.locator("#job-title").focus()  # no focus ring in the picture
    # docs/job-page.png (the README's picture) is a copy of this one.
    screenshot(page_a, "job-page-with-comments.png")
    screenshot(page_c, "job-page-viewer.png")
    # On the list, a viewer is told why there is no submit form.
    page_c.locator("a.brand").click()
    expect(page_c.locator("#submit-disabled")).to_contain_text("viewer")
    expect(page_c.locator("#job-prompt")).to_have_count(0)
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
    # A second tab, phone-sized, on the jobs list: its row follows the job live.
    list_ctx, list_page, list_console = new_page(browser, viewport=PHONE)
    sign_in_via_fragment(list_page, serve.url, submitter)
    row = list_page.locator(f"li.job-row[data-job-id='{job['id']}']")
    expect(row).to_have_attribute("data-status", "running", timeout=20_000)
    sign_in_via_fragment(page, serve.url, submitter, f"#/jobs/{job['id']}")
    indicator = page.locator("#connection")
    expect(indicator).to_have_attribute("data-state", "live")
    expect(page.locator("#steps li.step")).not_to_have_count(0, timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("Running")

    # Stop the server (graceful: 1001), comment while it is away, start a new one.
    console.allow(*OUTAGE)
    list_console.allow(*OUTAGE)
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
    # The step log is windowed: it counts every step, and the rows in view
    # (the end, where it follows the job) are the job's last steps in order.
    expect(page.locator("#steps")).to_have_attribute("data-count", str(len(expected)))
    shown = dom_step_ids(page)
    assert len(shown) == len(set(shown)), "a step is shown twice"
    assert shown == expected[-len(shown):], f"{len(shown)} steps shown, {len(expected)} in the job"
    assert page.locator("#steps li.step[data-state='started']").count() == 0
    chats = [i for i in items if i["type"] == "chat" and "while the server was away" in i["text"]]
    assert len(chats) == 1
    expect(page.locator("li.comment", has_text="while the server was away")).to_have_count(1)
    screenshot(page, "job-page-after-restart.png")
    expect(row).to_have_attribute("data-status", "succeeded", timeout=20_000)
    expect(row.locator(".job-todos")).to_have_text("10/10 to-dos")
    assert list_page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(list_page, "jobs-list-phone.png")
    console.assert_clean()
    list_console.assert_clean()
    context.close()
    list_ctx.close()


def test_cancel_from_the_job_page(service: Any, make_token: Any, browser: Any) -> None:
    _, serve = service(replay_speed=1.0)
    submitter = token(make_token, "submitter", "sam")
    job = submit_job(serve.url, submitter, "[long] a job to stop")
    context, page, console = new_page(browser)
    sign_in_via_fragment(page, serve.url, submitter, f"#/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_text("Running", timeout=20_000)
    page.get_by_role("button", name="Cancel job").click()
    # A second, explicit confirmation: one stray tap must not stop a job.
    expect(page.get_by_role("button", name="Yes, cancel it")).to_be_focused()
    page.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator("#job-status")).to_have_text("Cancelled", timeout=30_000)
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    expect(page.locator(".result-card")).to_contain_text("Cancelled")
    assert page.locator("#steps li.step[data-state='started']").count() == 0
    screenshot(page, "job-page-cancelled.png")
    console.assert_clean()
    context.close()


# --------------------------------------------------------------------------
# The socket client's policy, against a scripted /ws (Playwright's
# route_web_socket) while tickets and snapshots come from the real server.
# --------------------------------------------------------------------------


class ScriptedGateway:
    """Stands in for /ws. ``script(conn_index, conn, msg)`` answers each client message."""

    def __init__(self, page: Any, script: Any) -> None:
        self.page = page
        self.script = script
        self.conns: list[dict[str, Any]] = []
        page.route_web_socket(re.compile(r"/ws$"), self._accept)

    def _accept(self, ws: Any) -> None:
        conn: dict[str, Any] = {"ws": ws, "received": [], "closed": None}
        index = len(self.conns)
        self.conns.append(conn)
        ws.on_close(lambda code, reason: conn.__setitem__("closed", (code, reason)))

        def on_message(raw: str | bytes) -> None:
            msg = json.loads(raw)
            conn["received"].append(msg)
            self.script(index, conn, msg)

        ws.on_message(on_message)

    def wait(self, pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
        """Poll with Playwright's own wait, so the page's socket events keep flowing."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; connections: {[c['received'] for c in self.conns]}")
            self.page.wait_for_timeout(50)


def send(conn: dict[str, Any], **msg: Any) -> None:
    conn["ws"].send(json.dumps(msg))


def auth_ok(conn: dict[str, Any], *, heartbeat_ms: int = 25_000, expires_in_ms: int = 3_600_000) -> None:
    send(conn, type="auth_ok", connectionId="c", userId="u-sam", heartbeatMs=heartbeat_ms, expiresAt=int(time.time() * 1000) + expires_in_ms)


def step_event(room: str, eid: str, step: str) -> dict[str, Any]:
    data = {"stepId": step, "tool": "Read", "title": f"src/{step}.py", "state": "ok", "durationMs": 5}
    return {"type": "event", "roomId": room, "id": eid, "kind": "step", "at": int(time.time() * 1000), "data": data}


def test_socket_client_policy(service_serve_only: Any, make_token: Any, browser: Any) -> None:
    serve = service_serve_only()
    submitter = token(make_token, "submitter", "sam")
    job = submit_job(serve.url, submitter, "a job nobody runs")  # no worker: stays queued
    room = job["roomId"]

    # 1. Resume: rejoin with the last id seen, a fresh ticket per connect,
    #    duplicates and stale ids dropped; the page shows each step once.
    def resume(i: int, conn: dict[str, Any], msg: dict[str, Any]) -> None:
        if msg["type"] == "auth":
            auth_ok(conn)
        elif msg["type"] == "join" and i == 0:
            send(conn, type="joined", roomId=room, role="submitter", snapshot=job, head="102-0", presence=[])
            for eid, step in (("100-0", "a"), ("101-0", "b"), ("100-0", "a"), ("99-0", "z")):
                conn["ws"].send(json.dumps(step_event(room, eid, step)))
            conn["ws"].close(code=1001, reason="server restarting")
        elif msg["type"] == "join":
            send(conn, type="joined", roomId=room, role="submitter", snapshot=job, head="103-0", presence=[])
            # a batch frame (the client asked for batch): a repeat, then new ones
            conn["ws"].send(json.dumps([step_event(room, "101-0", "b"), step_event(room, "102-0", "c")]))
            conn["ws"].send(json.dumps(step_event(room, "103-0", "d")))

    context, page, console = new_page(browser)
    gw = ScriptedGateway(page, resume)
    # A deep link: the route and the token in one fragment (the list's rooms stay out of the script).
    page.goto(f"{serve.url}/#/jobs/{job['id']}&token={submitter}")
    expect(page.locator(".job-page")).to_be_visible()
    assert "token" not in page.url and page.url.endswith(f"#/jobs/{job['id']}")
    gw.wait(lambda: len(gw.conns) >= 2 and any(m["type"] == "join" for m in gw.conns[1]["received"]), what="a rejoin")
    expect(page.locator("#steps li.step")).to_have_count(4)
    assert dom_step_ids(page) == ["a", "b", "c", "d"]
    first, second = (c["received"] for c in gw.conns[:2])
    assert [m["type"] for m in first[:2]] == ["auth", "join"] and "since" not in first[1]
    assert second[1] == {"type": "join", "roomId": room, "since": "101-0"}
    assert first[0]["token"].startswith("pst_") and first[0]["token"] != second[0]["token"], "a ticket is used once"
    assert first[0]["token"] != submitter and first[0]["batch"] is True
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    console.assert_clean()
    context.close()

    # 2. Heartbeat watchdog: silence for 2 x heartbeatMs closes and reconnects;
    #    credentials are refreshed with a fresh ticket before they expire.
    def silent(i: int, conn: dict[str, Any], msg: dict[str, Any]) -> None:
        if msg["type"] == "auth" and not any(m["type"] == "auth" for m in conn["received"][:-1]):
            auth_ok(conn, heartbeat_ms=400 if i == 0 else 25_000, expires_in_ms=25_000 if i == 0 else 3_000)
        elif msg["type"] == "auth":
            auth_ok(conn, expires_in_ms=3_600_000)  # the refresh

    context, page, console = new_page(browser)
    gw = ScriptedGateway(page, silent)
    sign_in_via_fragment(page, serve.url, submitter)
    gw.wait(lambda: len(gw.conns) >= 2, what="a reconnect after 2 x heartbeatMs of silence")
    gw.wait(lambda: gw.conns[0]["closed"] is not None, what="the silent connection closed")
    assert gw.conns[0]["closed"][0] == 4000
    gw.wait(lambda: sum(m["type"] == "auth" for m in gw.conns[1]["received"]) >= 2, what="a credential refresh")
    refresh = [m for m in gw.conns[1]["received"] if m["type"] == "auth"]
    assert refresh[1]["token"].startswith("pst_") and refresh[1]["token"] != refresh[0]["token"]
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    console.assert_clean()
    context.close()

    # 3. 4401 (credentials expired): a fresh ticket and a new connection.
    #    1009 (our message too large): stop, say so, offer a manual retry.
    def expire_then_refuse(i: int, conn: dict[str, Any], msg: dict[str, Any]) -> None:
        if msg["type"] != "auth":
            return
        if i == 0:
            conn["ws"].close(code=4401, reason="token expired")
        else:
            conn["ws"].close(code=1009, reason="message too large")

    context, page, console = new_page(browser)
    gw = ScriptedGateway(page, expire_then_refuse)
    sign_in_via_fragment(page, serve.url, submitter)
    indicator = page.locator("#connection")
    expect(indicator).to_have_attribute("data-state", "offline", timeout=10_000)
    assert len(gw.conns) == 2
    assert gw.conns[0]["received"][0]["token"] != gw.conns[1]["received"][0]["token"]
    expect(indicator).to_contain_text("Offline")
    assert "too large" in (indicator.get_attribute("title") or "")
    expect(indicator.get_by_role("button", name="Retry")).to_be_visible()
    page.wait_for_timeout(1500)
    assert len(gw.conns) == 2, "no automatic retry after 1009"
    console.assert_clean()
    context.close()

    # 4. A gap (since older than what is retained) is never silent: the page
    #    says so and re-reads the snapshot and the comments over HTTP.
    def gap(i: int, conn: dict[str, Any], msg: dict[str, Any]) -> None:
        if msg["type"] == "auth":
            auth_ok(conn)
        elif msg["type"] == "join":
            send(conn, type="joined", roomId=room, role="viewer", snapshot=job, head="500-0", presence=[])
            send(conn, type="gap", roomId=room, since="1-0", oldest="400-0")

    context, page, console = new_page(browser)
    gw = ScriptedGateway(page, gap)
    reads: list[str] = []
    page.on("request", lambda r: reads.append(r.url.split("?")[0]) if r.method == "GET" else None)
    page.goto(f"{serve.url}/#/jobs/{job['id']}&token={submitter}")
    expect(page.locator(".banner-warn", has_text="no longer kept")).to_be_visible()
    gw.wait(lambda: reads.count(f"{serve.url}/api/jobs/{job['id']}") >= 2, what="the snapshot re-read")
    gw.wait(lambda: f"{serve.url}/api/jobs/{job['id']}/comments" in reads, what="the comments re-read")
    expect(page.locator("#comment-reason")).to_contain_text("viewer")
    console.assert_clean()
    context.close()

    # 5. 4403 (auth failed): stop and ask the user to sign in again.
    def refuse(i: int, conn: dict[str, Any], msg: dict[str, Any]) -> None:
        if msg["type"] == "auth":
            conn["ws"].close(code=4403, reason="auth failed")

    context, page, console = new_page(browser)
    gw = ScriptedGateway(page, refuse)
    page.goto(f"{serve.url}/#token={submitter}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible(timeout=10_000)
    expect(page.locator(".signin-card .notice")).to_contain_text("Sign in again")
    page.wait_for_timeout(1500)
    assert len(gw.conns) == 1, "no retry after 4403"
    console.assert_clean()
    context.close()


def test_backoff_and_id_order_in_the_page(service_serve_only: Any, browser: Any) -> None:
    """The module's pure parts, imported by the page itself (same CSP as the app)."""
    serve = service_serve_only()
    context, page, console = new_page(browser)
    page.goto(serve.url + "/")
    result = page.evaluate(
        """async () => {
            const m = await import('/js/socket.js');
            const top = Array.from({length: 8}, (_, a) => m.backoffDelay(a, () => 1));
            const low = Array.from({length: 8}, (_, a) => m.backoffDelay(a, () => 0));
            const visible = Array.from({length: 8}, (_, a) => m.backoffDelay(a, () => 1, m.VISIBLE_CAP_MS));
            return {
              top, low, visible,
              ids: [m.compareIds('9-0', '10-0') < 0, m.compareIds('10-1', '10-0') > 0,
                    m.compareIds('1700000000000-5', '1700000000000-5') === 0,
                    m.compareIds('1700000000000-10', '1700000000000-9') > 0,
                    m.compareIds('18446744073709551615-0', '18446744073709551614-0') > 0],
            };
        }"""
    )
    assert result["top"] == [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]  # a hidden tab
    assert result["visible"] == [500, 1000, 1500, 1500, 1500, 1500, 1500, 1500]
    assert result["low"] == [0] * 8
    assert all(result["ids"])
    console.assert_clean()
    context.close()
