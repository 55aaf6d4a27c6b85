"""What the terminal says about a job's events and comments, one line each.

Both renderers (``render``) show these texts, the plain one as whole lines
(:func:`format_event`, :func:`format_chat`), the rich one as parts of its
styled lines (:func:`describe_event`, :func:`describe_step`, ...): one
wording for both, so they say the same thing. Free text is flattened to one
line and clipped (:func:`one_line`), so an event never moves the cursor.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from progress_service.events import ChatMsg, EventMsg

_WS = re.compile(r"\s+")

#: Longest free text (message, summary, comment) on one plain line.
LINE_TEXT_MAX = 300


def one_line(text: Any, limit: int = LINE_TEXT_MAX) -> str:
    """``text`` on one line: whitespace runs (newlines too) become one space, clipped."""
    flat = _WS.sub(" ", str(text)).strip()
    # Other control characters could move the cursor or ring the bell.
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def format_clock(ms: int) -> str:
    """An epoch-ms time as ``HH:MM:SS`` local time (``--:--:--`` when unknown)."""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms > 0 else "--:--:--"


def format_duration(ms: Any) -> str:
    """``120 ms`` or ``1.5 s`` (empty when not a number)."""
    if not isinstance(ms, int | float):
        return ""
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def format_cost(usd: Any) -> str:
    """``$0.0123`` (empty when not a number)."""
    return f"${usd:.4f}" if isinstance(usd, int | float) else ""


def describe_step(d: dict[str, Any]) -> str:
    """``Edit src/app.py (120 ms)``: a step's tool, title and duration."""
    dur = format_duration(d.get("durationMs"))
    return f"{d.get('tool')} {one_line(d.get('title', ''), 160)}" + (f" ({dur})" if dur else "")


def describe_permission(d: dict[str, Any], job_id: str | None = None) -> str:
    """A permission prompt and how to answer it, or its outcome."""
    what = f"{d.get('tool')} {one_line(json.dumps(d.get('input') or {}, ensure_ascii=False), 200)}".rstrip(" {}")
    if d.get("state") == "pending":
        how = f"progress-service decide {job_id or 'JOB_ID'} {d.get('permissionId')} allow|deny"
        return f"pending: {what}; answer: {how}"
    who = f" by {one_line(d['by'], 80)}" if d.get("by") else ""
    said = f": {one_line(d['message'], 200)}" if d.get("message") else ""
    return f"{d.get('state')} {d.get('tool')} ({d.get('permissionId')}){who}{said}"


def describe_event(kind: str, data: dict[str, Any], job_id: str | None = None) -> str:
    """The human part of one event, on one line (no time, no kind)."""
    d = data
    if kind == "status":
        text = f"{d.get('status')} (phase {d.get('phase')})"
        return text + (f": {one_line(d['reason'])}" if d.get("reason") else "")
    if kind == "phase":
        return str(d.get("phase"))
    if kind == "step":
        return f"{d.get('state')} {describe_step(d)}"
    if kind == "message":
        return one_line(d.get("text", ""))
    if kind == "todo":
        items = d.get("items") or []
        now = next((i.get("text") for i in items if isinstance(i, dict) and i.get("state") == "in_progress"), None)
        return f"{d.get('done')}/{d.get('total')} done" + (f"; now: {one_line(now, 120)}" if now else "")
    if kind == "usage":
        cost = format_cost(d.get("costUsd"))
        return f"{d.get('inputTokens')} in / {d.get('outputTokens')} out tokens" + (f", {cost}" if cost else "")
    if kind == "log":
        return f"{d.get('stream')}: {one_line(d.get('line', ''))}"
    if kind == "result":
        head = "ok" if d.get("ok") else "FAILED"
        parts = [head, f"{d.get('turns')} turns", format_duration(d.get("durationMs")), format_cost(d.get("costUsd"))]
        text = ", ".join(p for p in parts if p)
        if d.get("error"):
            text += f"; error: {one_line(d['error'], 200)}"
        if d.get("summary"):
            text += f"; {one_line(d['summary'], 200)}"
        return text
    if kind == "worker":
        return f"{d.get('state')} ({d.get('workerId')})"
    if kind == "turn":
        return f"prompt {d.get('turn')}: {one_line(d.get('prompt', ''))}"
    if kind == "retry":
        return one_line(d.get("text") or f"retrying the API ({d.get('attempt')}/{d.get('maxRetries')})")
    if kind == "notice":
        return f"{d.get('kind')}: {one_line(d.get('text', ''))}"
    if kind == "instruction":
        text = f"{d.get('state')} from {one_line(d.get('by', ''), 80)}: {one_line(d.get('text', ''), 300)}"
        return text + (f" ({one_line(d['reason'], 200)})" if d.get("reason") else "")
    if kind == "permission":
        return describe_permission(d, job_id)
    # A kind this client does not know yet: show its data rather than drop it.
    return one_line(json.dumps(d, separators=(",", ":"), ensure_ascii=False))


def format_event(msg: EventMsg, job_id: str | None = None) -> str:
    """One plain line for an event: ``12:00:01 step     ok Edit src/app.py (120 ms)``."""
    attempt = f" [attempt {msg.attempt}]" if msg.attempt > 1 else ""
    return f"{format_clock(msg.at)} {msg.kind:<8} {describe_event(msg.kind, msg.data, job_id)}{attempt}"


def format_chat(msg: ChatMsg) -> str:
    """One plain line for a comment: ``12:00:03 comment  alice: looks good``."""
    return f"{format_clock(msg.sentAt)} {'comment':<8} {one_line(msg.userName, 80)}: {one_line(msg.text, 1000)}"
