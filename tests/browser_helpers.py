"""Helpers for the browser tests: headless Chromium, console watching, HTTP calls.

Playwright's sync API drives Debian's Chromium (Playwright cannot download
its own browser here). Every page gets a :class:`ConsoleWatch` that records
console errors and uncaught exceptions; a test states which errors it
provokes on purpose (a 401 on a bad token, a 400 on a bad form), and any
other error fails it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@contextmanager
def chromium(executable_path: str) -> Iterator[Any]:
    """A headless Chromium browser, closed at the end of the block."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional test dependency

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable_path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleWatch:
    """Console errors and page errors of one page, with the ones a test expects."""

    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def allow(self, *patterns: str) -> None:
        """Errors the test provokes on purpose (matched with ``re.search``)."""
        self.allowed.extend(re.compile(p) for p in patterns)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def assert_clean(self) -> None:
        bad = self.unexpected()
        assert not bad, "console errors:\n" + "\n".join(bad)


def new_page(browser: Any, *, viewport: dict[str, int] = DESKTOP) -> tuple[Any, Any, ConsoleWatch]:
    """A fresh context (own sessionStorage: one user) and page with a console watch."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    watch = ConsoleWatch()
    watch.attach(page)
    return context, page, watch


def sign_in_via_fragment(page: Any, base_url: str, token: str, route: str = "") -> None:
    """Open the link ``progress-service dev`` prints, then go to ``route`` (e.g. ``#/jobs/<id>``)."""
    page.goto(f"{base_url}/#token={token}")
    page.locator("#status-filter").wait_for(timeout=15_000)  # the jobs view: signed in
    if route:
        page.goto(f"{base_url}/{route}")


def api(base_url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def submit_job(base_url: str, token: str, prompt: str, **spec: Any) -> dict[str, Any]:
    with api(base_url, token) as c:
        r = c.post("/api/jobs", json={"prompt": prompt, **spec})
        assert r.status_code == 201, r.text
        return r.json()


def job_events(base_url: str, token: str, job_id: str) -> list[dict[str, Any]]:
    """Every retained room item of a job (events and comments), in order."""
    items: list[dict[str, Any]] = []
    since: str | None = None
    with api(base_url, token) as c:
        while True:
            params = {"limit": 1000, **({"since": since} if since else {})}
            page = c.get(f"/api/jobs/{job_id}/events", params=params).json()
            items.extend(page["items"])
            if not page["items"]:
                return items
            since = page["next"]


def step_ids(items: Iterable[dict[str, Any]]) -> list[str]:
    """Distinct step ids of a job's events, in order of first appearance."""
    seen: dict[str, None] = {}
    for it in items:
        if it.get("type") == "event" and it.get("kind") == "step":
            seen.setdefault(it["data"]["stepId"], None)
    return list(seen)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot under test-artifacts/ (gitignored) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path
