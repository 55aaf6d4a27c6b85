"""The job page people expect (issue 13), in real headless Chromium against a real stack.

One ``serve`` + ``worker`` pair on a private Redis and one browser serve the
whole module; each test opens its own contexts (a context is one browser
profile: its cookies are one user's sign-in). Jobs are demo runs of the
replay program (``PS_REPLAY_SPEED``), some on transcripts generated per test.
Desktop is 1440×900, phone 390×844.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser_helpers import CHROMIUM_ARGS, ConsoleWatch, screenshot, submit_job, wait_until
from page_helpers import Stack, inject_job, write_transcript
from progress_service.embedded_redis import embedded_redis

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE = Path(__file__).resolve().parent / "vendor" / "axe-4.14.1.min.js"
OUTAGE = (
    r"net::ERR_CONNECTION_REFUSED",
    r"WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws' failed",
    r"Failed to load resource: net::ERR_",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with embedded_redis() as redis_url:
        # A short lease: a killed worker is declared lost within seconds.
        s = Stack(tmp_path_factory.mktemp("page"), redis_url, lease_ttl=1.5, job_max_tries=2)
        try:
            yield s
        finally:
            s.close()


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def sam(stack: Stack) -> str:
    return stack.token("submitter", "sam")


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect  # noqa: PLC0415

    return pw_expect(locator)


def open_context(browser: Any, viewport: dict[str, int] = DESKTOP, **kw: Any) -> tuple[Any, Any, ConsoleWatch]:
    context = browser.new_context(viewport=viewport, **kw)
    page = context.new_page()
    watch = ConsoleWatch()
    watch.attach(page)
    return context, page, watch


def sign_in(page: Any, stack: Stack, token: str, route: str = "") -> None:
    page.goto(f"{stack.url}/#token={token}")
    page.locator("#status-filter").wait_for(timeout=15_000)
    if route:
        page.goto(f"{stack.url}/{route}")


def wait_status(stack: Stack, token: str, job_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        snap = httpx.get(f"{stack.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        found.update(snap)
        return snap["status"] in statuses

    wait_until(done, timeout=timeout, what=f"job {job_id} to reach {statuses}")
    return found


def page_fits_content(page: Any) -> tuple[int, int]:
    """(document height, bottom of the page's content): equal when nothing hangs out below it.

    Whatever escapes its box (the visually hidden text of a scrolled list,
    say) makes the document taller than ``main`` and shows as blank pixels.
    """
    return page.evaluate(
        """() => {
            const bottom = document.querySelector('main').getBoundingClientRect().bottom + window.scrollY;
            return [document.documentElement.scrollHeight, Math.ceil(Math.max(window.innerHeight, bottom))];
        }"""
    )


# "Within rounding": each data-ms is rounded to 1 ms, and the first phase is
# stamped right after the `running` event the page dates the job's start from.
SAME_CLOCK_MS = 10
# The record's startedAt is read a moment before that event is stamped (the
# worker takes its publish lock in between: an await on a busy machine).
RECORD_STAMP_MS = 50
_DURATION = re.compile(r"^(?:(\d+) h (\d+) min|(\d+) min (\d+) s|(\d+(?:\.\d)?) s|(\d+) ms)$")


def parse_duration(text: str) -> tuple[float, float]:
    """(ms, how far the exact value may be from it) for a duration as the page writes it."""
    m = _DURATION.match(text.strip())
    assert m, f"not a duration: {text!r}"
    h, hm, mi, ms_, s, ms = m.groups()
    if h is not None:
        return (int(h) * 3600 + int(hm) * 60) * 1000.0, 60_000.0  # minutes are floored
    if mi is not None:
        return (int(mi) * 60 + int(ms_)) * 1000.0, 1000.0  # seconds are floored
    if s is not None:
        return float(s) * 1000, 50.0 if "." in s else 500.0
    return float(ms), 0.5


def assert_rounds_to(exact: int, text: str, what: str) -> None:
    """``text`` is how the page writes ``exact`` ms (rounded, or floored for min/h)."""
    approx, slack = parse_duration(text)
    lo, hi = (approx, approx + slack) if slack >= 1000 else (approx - slack, approx + slack)
    assert lo <= exact <= hi, f"{what} shows {text!r} for {exact} ms"


def exact_ms(locator: Any, attr: str = "data-ms") -> int:
    """A duration's exact ms from the page's markup."""
    value = locator.get_attribute(attr)
    assert value is not None and value.isdigit(), f"{attr}={value!r}"
    return int(value)


def assert_durations_from_one_clock(page: Any, stack: Stack, token: str, job_id: str) -> dict[str, Any]:
    """The phase strip, the stats' Duration and the result card agree with the server's record.

    Each value is read from the real page: its exact ``data-ms`` and the
    visible text it must round from. The visited phases after ``queued`` tile
    the attempt, so they add up to the job's duration (a single attempt); that
    duration is the server's ``finishedAt - startedAt`` (within RECORD_STAMP_MS).
    Returns the server's record.
    """
    record = httpx.get(f"{stack.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    assert record["attempt"] == 1 and record["startedAt"] and record["finishedAt"], record
    served = record["finishedAt"] - record["startedAt"]
    # The Duration has its exact value in the markup (data-ms), as every phase does.
    duration_dd = page.locator(".stats .stat", has_text="Duration").locator("dd")
    expect(duration_dd).to_have_attribute("data-ms", re.compile(r"^\d+$"))
    total = exact_ms(duration_dd)
    assert_rounds_to(total, duration_dd.inner_text(), "Duration")
    phases = page.locator(".phase[data-state=done]:not([data-phase=queued])")
    names = phases.evaluate_all("els => els.map(e => e.dataset.phase)")
    assert names and names[0] == "starting", names
    spans: dict[str, int] = {}
    for i, name in enumerate(names):
        li = phases.nth(i)
        spans[name] = exact_ms(li)
        assert_rounds_to(spans[name], li.locator(".phase-time").inner_text(), name)
    assert abs(sum(spans.values()) - total) <= SAME_CLOCK_MS, f"phases {spans} add up to {sum(spans.values())} ms, the job shows {total} ms"
    assert -SAME_CLOCK_MS <= served - total <= RECORD_STAMP_MS, f"the page shows {total} ms, the server recorded {served} ms"
    # The result card's duration (the usage line) is the same number.
    card = page.locator("#result-stats")
    assert int(card.get_attribute("data-duration-ms") or -1) == total
    text = duration_dd.inner_text()
    assert text in card.inner_text().split(" · "), (text, card.inner_text())
    return record


# --------------------------------------------------------------------------


def test_a_600_step_log_opens_links_filters_and_downloads(stack: Stack, sam: str, browser: Any) -> None:
    gen = Path(stack.settings.workspace_root) / "gen"
    gen.mkdir(exist_ok=True)
    write_transcript(gen / "six-hundred.jsonl", 600)
    job = submit_job(stack.url, sam, "[transcript:six-hundred.jsonl] refactor everything", workdir="gen")
    context, page, console = open_context(browser)
    sign_in(page, stack, sam, f"#/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_text("Succeeded", timeout=90_000)
    steps = page.locator("#steps")
    expect(steps).to_have_attribute("data-count", "603", timeout=15_000)  # 601 + 2 inside the subagent
    assert page.locator("#steps > li").count() < 80, "the list is windowed"

    # No blank pixels: the document is exactly as tall as its content.
    height, content = page_fits_content(page)
    assert abs(height - content) <= 2, (height, content)

    # The result is Markdown, sanitized: code and a list, no script, no raw tags.
    summary = page.locator(".result-summary")
    expect(summary.locator("code").first).to_have_text("average")
    expect(summary.locator("li")).to_have_count(2)
    assert summary.locator("script, img").count() == 0 and page.evaluate("() => window.__pwned") is None
    assert "`" not in summary.inner_text()

    # Filter: only matching steps, with a count; then open the failed test run.
    page.get_by_label("Filter steps").fill("pytest")
    expect(page.locator("#step-filter-status")).to_have_text("1 of 603 steps match")
    row = page.locator("#steps li.step[data-state='error']")
    expect(row).to_have_count(1)
    row.locator(".step-open").click()
    detail = page.locator("#step-detail")
    expect(detail).to_contain_text("pytest -q tests/test_calc.py")
    expect(detail).to_contain_text("exit code 2")
    expect(detail.locator(".step-error")).to_have_text("Exit code 2")
    expect(detail).to_contain_text("FAILED tests/test_calc.py::test_mean")

    # An edit shows its diff; a subagent's steps are nested under it.
    page.get_by_label("Filter steps").fill("src/calc.py")
    page.locator("#steps li.step .step-open").first.click()
    expect(detail.locator(".diff .del")).to_contain_text("-return sum(xs) // len(xs)")
    expect(detail.locator(".diff .add")).to_contain_text("+return sum(xs) / len(xs)")
    page.get_by_label("Filter steps").fill("average\\(")
    nested = page.locator("#steps li.step[data-depth='1']")
    expect(nested).to_have_count(1)
    nested.locator(".step-open").click()
    expect(detail).to_contain_text("Ran inside subagent step")

    # A long output is bounded, with "show all".
    page.get_by_label("Filter steps").fill("cat big.log")
    page.locator("#steps li.step .step-open").first.click()
    show_all = detail.get_by_role("button", name=re.compile(r"Show all \(\d[\d,]* characters\)"))
    expect(show_all).to_be_visible()
    before = len(detail.locator(".step-text").last.inner_text())
    show_all.click()
    assert len(detail.locator(".step-text").last.inner_text()) > before
    page.get_by_label("Filter steps").fill("")

    # The raw log: the job's events as JSON lines.
    with page.expect_download() as info:
        page.get_by_role("link", name="Download raw log").click()
    lines = [json.loads(line) for line in Path(info.value.path()).read_text().splitlines()]
    assert sum(1 for e in lines if e.get("kind") == "step" and e["data"]["state"] != "started") == 603

    # A step link in a new tab of the same browser: signed in, on that step.
    tab = context.new_page()
    tab_console = ConsoleWatch()
    tab_console.attach(tab)
    tab.goto(f"{stack.url}/#/jobs/{job['id']}/step-42")
    target = tab.locator("#steps li#step-42")
    expect(target).to_have_attribute("data-highlight", "", timeout=20_000)
    expect(tab.locator("#step-detail-title")).to_have_text(re.compile(r"^Step 42: "))
    box = tab.locator(".steps-box").bounding_box()
    row_box = target.bounding_box()
    assert box and row_box and box["y"] <= row_box["y"] and row_box["y"] + row_box["height"] <= box["y"] + box["height"]
    assert 0 <= row_box["y"] <= DESKTOP["height"], "the step is scrolled into view"
    expect(tab.locator("#whoami")).to_contain_text("sam")
    screenshot(tab, "page-step-link.png", full_page=False)

    # Phone: no sideways scroll, a bounded step list, nothing blank below.
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.locator(".steps-box").bounding_box()["height"] <= PHONE["height"] * 0.55
    height, content = page_fits_content(page)
    assert abs(height - content) <= 2, (height, content)
    comments_top = page.locator(".comments-card, #comments-title").first.bounding_box()["y"]
    assert comments_top < 6000, comments_top
    expect(page.locator("#whoami")).to_be_visible()
    screenshot(page, "page-600-steps-phone.png")

    # Sign-out in one tab ends the session for all of them; the cookie is gone.
    tab.get_by_role("button", name="Sign out").click()
    expect(tab.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible(timeout=10_000)
    assert not [c for c in context.cookies() if c["name"] == "ps_session" and c["value"]]
    console.assert_clean()
    tab_console.assert_clean()
    context.close()


def test_progress_never_decreases_and_the_model_appears_live(stack: Stack, sam: str, browser: Any) -> None:
    context, page, console = open_context(browser)
    sign_in(page, stack, sam)
    # The job form is the first thing after the top bar in tab order.
    stops = []
    for _ in range(6):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("() => document.activeElement.id || document.activeElement.className"))
        if stops[-1] == "job-prompt":
            break
    assert stops[-1] == "job-prompt" and len(stops) <= 4, stops
    page.get_by_label("Prompt").fill("Fix the rounding bug")
    # Record every value the bar and the phase strip show, as they change.
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".job-page")).to_be_visible()
    page.evaluate(
        """() => {
            window.__seen = [];
            window.__phases = [];
            window.__clock = [];
            const record = () => {
                const bar = document.querySelector('#job-progress');
                if (bar && bar.dataset.percent) window.__seen.push(Number(bar.dataset.percent));
                const cur = document.querySelector('.phase[data-state=current]');
                const done = [...document.querySelectorAll('.phase[data-state=done]')].map(e => e.dataset.phase);
                window.__phases.push({current: cur ? cur.dataset.phase : null, done});
                // The running Duration and phase times, with when (browser clock) they were shown.
                const dd = [...document.querySelectorAll('.stats .stat')].find(e => e.querySelector('dt')?.textContent === 'Duration')?.querySelector('dd');
                const spans = [...document.querySelectorAll('.phase[data-ms]:not([data-phase=queued])')].map(e => Number(e.dataset.ms));
                if (bar && dd && dd.dataset.ms) window.__clock.push({at: Date.now(), status: bar.dataset.status, ms: Number(dd.dataset.ms), phases: spans.reduce((a, b) => a + b, 0)});
            };
            new MutationObserver(record).observe(document.querySelector('main'), {subtree: true, attributes: true, childList: true});
            record();
        }"""
    )
    # The model comes from Claude Code's first line: shown without a reload.
    expect(page.locator(".job-meta")).to_contain_text(re.compile(r"Model claude-[a-z0-9.-]+"), timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("Succeeded", timeout=60_000)
    seen = page.evaluate("() => window.__seen")
    assert len(seen) > 5 and seen[-1] == 100
    assert all(b >= a for a, b in zip(seen, seen[1:])), f"progress went back: {seen}"
    phases = page.evaluate("() => window.__phases")
    finished: set[str] = set()
    for snap in phases:
        assert snap["current"] not in finished, f"{snap['current']} shown current after it was done"
        finished |= set(snap["done"])
    # Durations from one clock: the phases add up to the job's duration, and
    # that is the server's record of the job (started to finished).
    record = assert_durations_from_one_clock(page, stack, sam, page.url.rsplit("/", 1)[-1])
    # While it ran, too: every Duration shown was the phases' sum, never ran
    # backwards, and tracked the time since the server's startedAt (browser
    # and server share this machine's clock; behind only by event delivery).
    # The final value may be a few ms below the last running one: the job
    # ended that long before its status event reached the page.
    samples = page.evaluate("() => window.__clock")
    running = [x for x in samples if x["status"] == "running"]
    assert len(running) > 3, samples
    for x in samples:
        assert abs(x["phases"] - x["ms"]) <= SAME_CLOCK_MS, f"phases add up to {x['phases']} ms, the job shows {x['ms']} ms: {x}"
        elapsed = x["at"] - record["startedAt"]
        assert elapsed - 3000 <= x["ms"] <= elapsed + 2, f"shows {x['ms']} ms, {elapsed} ms after the server's start"
    shown = [x["ms"] for x in running]
    assert all(b >= a for a, b in zip(shown, shown[1:])), f"the duration went back: {shown}"
    console.assert_clean()
    context.close()


def test_end_states_explain_themselves(stack: Stack, sam: str, browser: Any) -> None:
    failed = submit_job(stack.url, sam, "[fail] call the API")
    max_turns = submit_job(stack.url, sam, "[max-turns] loop forever", maxTurns=4)
    long = submit_job(stack.url, sam, "[long] a job to stop")
    wait_status(stack, sam, long["id"], {"running"})
    wait_until(lambda: httpx.get(f"{stack.url}/api/jobs/{long['id']}", headers={"Authorization": f"Bearer {sam}"}).json()["progress"]["total"] > 0, what="to-dos")
    httpx.post(f"{stack.url}/api/jobs/{long['id']}/cancel", headers={"Authorization": f"Bearer {sam}"}).raise_for_status()
    for job in (failed, max_turns, long):
        wait_status(stack, sam, job["id"], {"failed", "cancelled", "succeeded"})

    context, page, console = open_context(browser, PHONE)
    sign_in(page, stack, sam)
    # Phone list: no sideways scroll even with error text; titles not cut short.
    expect(page.locator(f"li.job-row[data-job-id='{failed['id']}']")).to_have_attribute("data-status", "failed")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    title = page.locator(f"li.job-row[data-job-id='{max_turns['id']}'] .job-row-title")
    assert title.inner_text() == "[max-turns] loop forever"
    expect(page.locator("#whoami")).to_be_visible()
    screenshot(page, "page-list-phone.png")

    cases = [
        (failed, "overloaded", re.compile(r"Anthropic API was overloaded")),
        # The limit as the CLI reports it ("Reached maximum number of turns (N)").
        (max_turns, "max_turns", re.compile(r"turn limit: it used all \d+ turns")),
        (long, "cancelled", re.compile(r"Cancelled by sam while it was running")),
    ]
    for job, kind, sentence in cases:
        page.goto(f"{stack.url}/#/jobs/{job['id']}")
        card = page.locator(".result-card")
        expect(card).to_have_attribute("data-kind", kind, timeout=15_000)
        expect(page.locator("#result-sentence")).to_have_text(sentence)
        stats = page.locator("#result-stats")
        if kind == "cancelled":
            # The CLI reports the cost in its last line after SIGINT; the worker
            # reads it only when the cancel flag (not arq's abort) stops the
            # run (issue 9, i9-control). Otherwise the page says so plainly.
            expect(stats).to_contain_text(re.compile(r"\$\d|cost not reported"))
        else:
            expect(stats).to_contain_text(re.compile(r"\$\d"))
        expect(stats).to_contain_text(re.compile(r"\d[\d.]*[kM]? input · \d[\d.]*[kM]? output tokens"))
        assert "Phase" not in page.locator("#progress-label").inner_text()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    # The raw error is one disclosure away, not the headline.
    page.goto(f"{stack.url}/#/jobs/{failed['id']}")
    expect(page.locator(".result-detail summary")).to_have_text("Error details")
    assert "529" not in page.locator("#result-sentence").inner_text().replace("(529)", "")
    assert page.locator(".result-card").inner_text().count('{"type":"error"') <= 1
    # Cancelled with open to-dos: marked not finished.
    page.goto(f"{stack.url}/#/jobs/{long['id']}")
    expect(page.locator("#todos li[data-unfinished]").first).to_contain_text("not finished", timeout=15_000)
    screenshot(page, "page-cancelled-phone.png")
    # Run again: a new job with the same spec.
    page.get_by_role("button", name="Run again").click()
    expect(page.locator(".job-page")).not_to_have_attribute("data-job-id", long["id"], timeout=15_000)
    new_id = page.locator(".job-page").get_attribute("data-job-id")
    spec = httpx.get(f"{stack.url}/api/jobs/{new_id}/spec", headers={"Authorization": f"Bearer {sam}"}).json()
    assert spec["prompt"] == "[long] a job to stop"
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator("#job-status")).to_have_text("Cancelled", timeout=30_000)
    console.assert_clean()
    context.close()


def test_a_job_restarted_mid_run_shows_two_labelled_attempts(stack: Stack, sam: str, browser: Any) -> None:
    job = submit_job(stack.url, sam, "[long] survive a lost worker")
    context, page, console = open_context(browser)
    sign_in(page, stack, sam, f"#/jobs/{job['id']}")
    expect(page.locator("#steps li.step").first).to_be_visible(timeout=20_000)
    stack.kill_worker()  # SIGKILL: the lease runs out, the job is run again
    # The list is windowed; a filter that matches no step leaves the attempt headings.
    page.get_by_label("Filter steps").fill("no step is called this")
    attempts = page.locator("#steps li.attempt-row")
    expect(attempts).to_have_count(2, timeout=30_000)
    expect(attempts.nth(0)).to_contain_text(re.compile(r"Attempt 1 · started .* ended: worker lost; retrying as attempt 2"))
    expect(page.locator("#job-status")).to_have_text("Succeeded", timeout=90_000)
    expect(attempts.nth(1)).to_contain_text(re.compile(r"Attempt 2 · started .* \d+ steps"))
    # Each attempt keeps its own steps and time.
    expect(attempts.nth(0)).to_contain_text(re.compile(r"Attempt 1 · started [^·]+ · [\d.]+ (ms|s) · [1-9]\d* steps? · ended"))
    expect(page.locator(".stats .stat", has_text="Attempts").locator("dd")).to_have_text("2")
    page.get_by_label("Filter steps").fill("")
    screenshot(page, "page-two-attempts.png")
    # A fresh load shows both attempts too.
    page.reload()
    page.get_by_label("Filter steps").fill("no step is called this")
    expect(page.locator("#steps li.attempt-row")).to_have_count(2, timeout=20_000)
    console.assert_clean()
    context.close()


def test_live_again_within_2_s_of_a_server_restart(stack: Stack, sam: str, browser: Any) -> None:
    context, page, console = open_context(browser)
    sign_in(page, stack, sam)
    indicator = page.locator("#connection")
    expect(indicator).to_have_attribute("data-state", "live")
    console.allow(*OUTAGE)
    stack.serve.stop()
    expect(indicator).to_have_attribute("data-state", "reconnecting", timeout=10_000)
    page.wait_for_timeout(6_000)  # long enough for an uncapped backoff to reach 16 s
    stack.serve = stack.start("serve")  # returns once /readyz answers
    back = time.monotonic()
    expect(indicator).to_have_attribute("data-state", "live", timeout=10_000)
    elapsed = time.monotonic() - back
    print(f"live again {elapsed:.2f} s after the server was back")
    # The page's own bound is 2 s (retry delay capped at 1.5 s while visible,
    # full jitter; measured 0.2-0.9 s on a quiet machine). The test bounds it
    # generously, as a busy machine delays the browser and the server too; an
    # uncapped backoff would be at 16 s here.
    assert elapsed < 4.0, f"live again {elapsed:.2f} s after the server was back"
    # Comments: sent, then delivered once the server acks it.
    job = submit_job(stack.url, sam, "a job to talk about")
    page.goto(f"{stack.url}/#/jobs/{job['id']}")
    page.get_by_label("Add a comment").fill("Looks right to me.")
    page.get_by_role("button", name="Comment").click()
    expect(page.locator("li.comment", has_text="Looks right").locator(".comment-state")).to_have_text("✓ Delivered", timeout=15_000)
    console.assert_clean()
    context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violations(stack: Stack, sam: str, browser: Any, scheme: str) -> None:
    job = submit_job(stack.url, sam, "[fail] an ended job to audit")
    wait_status(stack, sam, job["id"], {"failed"})
    # axe is injected from tests/vendor (the page's CSP forbids foreign scripts).
    context, page, console = open_context(browser, bypass_csp=True, color_scheme=scheme)

    def audit(view: str) -> None:
        page.add_script_tag(path=str(AXE))
        found = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations")
        bad = [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}" for v in found if v["impact"] in ("serious", "critical")]
        assert not bad, f"{view} ({scheme}): {bad}"

    page.goto(stack.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    audit("sign-in")
    sign_in(page, stack, sam)
    expect(page.locator(f"li.job-row[data-job-id='{job['id']}']")).to_be_visible()
    audit("job list")
    page.goto(f"{stack.url}/#/jobs/{job['id']}")
    expect(page.locator(".result-card")).to_be_visible(timeout=15_000)
    page.locator("#steps li.step .step-open").first.click()
    audit("job page")
    console.assert_clean()
    context.close()


def test_a_session_reported_through_hooks_is_labelled_and_offers_no_cancel(stack: Stack, sam: str, browser: Any) -> None:
    """A Claude Code session from a laptop: the list says where it runs; its page offers no cancel."""
    from hook_helpers import HOOK_PATH, Session  # noqa: PLC0415

    reporter = stack.token("reporter", "laptop-owner")
    s = Session(cwd="/home/dev/app")
    for body in (
        s.body("UserPromptSubmit", prompt="Rename the config loader"),
        s.pre("toolu_w1", "Bash", {"command": "git status"}),
        s.post("toolu_w1", "Bash", {"command": "git status"}, {"stdout": "clean", "stderr": ""}),
    ):
        resp = httpx.post(f"{stack.url}{HOOK_PATH}", json=body, headers={"Authorization": f"Bearer {reporter}", "X-PS-Host": "laptop-9"})
        assert resp.status_code == 204, resp.text
    wait_until(
        lambda: httpx.get(f"{stack.url}/api/jobs/{s.job_id}", headers={"Authorization": f"Bearer {sam}"}).json().get("step", {}) is not None,
        what="the session's first step",
    )
    context, page, console = open_context(browser)
    sign_in(page, stack, sam)
    row = page.locator(f"li.job-row[data-job-id='{s.job_id}']")
    expect(row.locator(".badge-session")).to_have_text("Session · laptop-9")
    expect(row.locator(".job-row-title")).to_have_text("Rename the config loader")
    page.goto(f"{stack.url}/#/jobs/{s.job_id}")
    expect(page.locator(".job-head-text")).to_contain_text("Claude Code session on laptop-9")
    expect(page.locator(".job-head-text")).to_contain_text("/home/dev/app")
    expect(page.locator("#steps")).to_contain_text("git status")
    # sam may cancel jobs, but not a session that runs elsewhere.
    assert page.locator("#cancel-job").count() == 0
    console.assert_clean()
    context.close()


def test_ten_thousand_steps_stay_smooth(stack: Stack, sam: str, browser: Any) -> None:
    gen = Path(stack.settings.workspace_root) / "gen"
    gen.mkdir(exist_ok=True)
    # The real mapper's events for 10,000 tool calls, written straight to Redis.
    job_id = inject_job(stack, write_transcript(gen / "ten-thousand.jsonl", 10_000))
    context, page, console = open_context(browser)
    # Every main-thread task over 50 ms, from the first byte on.
    context.add_init_script(
        "window.__long = []; new PerformanceObserver(l => { for (const e of l.getEntries()) window.__long.push(Math.round(e.duration)); }).observe({type: 'longtask', buffered: true});"
    )
    sign_in(page, stack, sam)
    page.evaluate("() => { window.__long = []; }")
    page.goto(f"{stack.url}/#/jobs/{job_id}")
    expect(page.locator("#steps")).to_have_attribute("data-count", "10003", timeout=60_000)
    loaded = page.evaluate("() => window.__long.slice()")
    box = page.locator(".steps-box")
    for top in (0, 50_000, 150_000, 320_000):
        box.evaluate(f"b => b.scrollTop = {top}")
        page.wait_for_timeout(60)
    page.get_by_label("Filter steps").fill("module_4242")
    expect(page.locator("#step-filter-status")).to_have_text("1 of 10003 steps match")
    page.get_by_label("Filter steps").fill("")
    page.locator("#steps li.step .step-open").last.click()
    expect(page.locator("#step-detail")).to_be_visible()
    page.wait_for_timeout(300)
    after = page.evaluate("() => window.__long.slice()")[len(loaded):]
    print(f"long tasks while loading: {loaded}; while scrolling, filtering, opening: {after}")
    # The page's work comes in chunks of at most ~8 ms (socket.js DRAIN_BUDGET_MS,
    # a windowed list, a throttled redraw during replay); on an idle machine
    # no task passes 50 ms. A long task is measured in wall time, and this
    # machine is shared by many test runs: the bound here catches a
    # regression (the issue saw 351 ms on 301 steps, so seconds on 10,000
    # unchunked) without measuring the neighbours' load: with two saturated
    # cores a chunked task was seen at 477 ms.
    budget = int(os.environ.get("PS_TEST_LONG_TASK_MS", "1500"))
    assert max(after, default=0) <= budget, after
    assert max(loaded, default=0) <= budget, loaded
    console.assert_clean()
    context.close()


def test_every_kind_of_ending_has_its_sentence(stack: Stack, browser: Any) -> None:
    """The page's own outcome module, imported in the page (same CSP as the app)."""
    context, page, console = open_context(browser)
    page.goto(stack.url + "/")
    found = page.evaluate(
        """async () => {
            const {describeOutcome} = await import('/js/outcome.js');
            const failed = (reason, result = null, extra = {}) => describeOutcome({status: 'failed', reason, result, attempt: 2, ...extra});
            return [
              failed('API Error: 529 {"type":"error","error":{"type":"overloaded_error"}}'),
              failed('Invalid API key · Please run /login'),
              failed('error_max_turns', {turns: 7, error: 'error_max_turns'}),
              failed('timed out after 600s'),
              failed('worker lost'),
              describeOutcome({status: 'cancelled', reason: 'cancelled by alice'}),
              describeOutcome({status: 'cancelled', reason: 'cancelled by bob before it started'}),
              failed('exited with code 1 and no result'),
            ].map(o => [o.kind, o.sentence, o.detail]);
        }"""
    )
    kinds = [k for k, _, _ in found]
    assert kinds == ["overloaded", "auth", "max_turns", "timeout", "worker_lost", "cancelled", "cancelled", "crashed"]
    sentences = [s for _, s, _ in found]
    assert "all 7 turns" in sentences[2] and "10 min" in sentences[3] and "attempt 2" in sentences[4]
    assert sentences[5] == "Cancelled by alice while it was running." and "bob before it started" in sentences[6]
    assert found[0][2].startswith("API Error: 529")  # the raw text, for the disclosure
    assert all('{"type"' not in s for s in sentences)
    console.assert_clean()
    context.close()
