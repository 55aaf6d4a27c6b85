"""What the terminal shows while following a job.

Two renderers implement :class:`~progress_service.terminal.client.FollowSink`:

- :class:`RichRenderer` (stdout is a terminal): a live panel that redraws in
  place (progress bar, status, phase, current step, to-dos, tokens and cost,
  connection state) with finished steps, comments and the result printed
  above it as they happen.
- :class:`PlainRenderer` (stdout is a pipe or file): exactly one line on
  stdout per event and per comment, never a redraw, so ``| grep`` and logs
  work. Connection notices go to stderr and never mix with the event lines.

Both say what ``describe`` words (one text per event for both renderers);
this module decides only how it is shown.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, TextIO

from progress_service.events import PHASES, TERMINAL_STATUSES, ChatMsg, EventMsg, JobSnapshot
from progress_service.terminal.describe import (
    describe_event,
    describe_permission,
    describe_step,
    format_chat,
    format_clock,
    format_cost,
    format_event,
    one_line,
)


class JobView:
    """The job's state as the renderers show it, kept from the snapshot and events."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.prompt = ""
        self.demo = False
        #: "session on <host>" for a Claude Code session reported through hooks.
        self.where = ""
        self.status = "queued"
        self.phase = "queued"
        self.step: dict[str, Any] | None = None
        self.todo_done = 0
        self.todo_total = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost: float | None = None
        self.result: dict[str, Any] | None = None
        self.steps_done = 0
        self.watchers: set[str] = set()
        self.connection = "connecting"
        self.connection_detail = ""
        #: "retrying the API (…)" while the CLI waits to retry, else "".
        self.retry = ""

    def apply_snapshot(self, s: JobSnapshot) -> None:
        """Take the whole state from a snapshot (on join and after a gap)."""
        self.prompt = s.prompt
        self.demo = s.demo
        if s.kind == "session":
            self.where = f"session on {s.session.host if s.session and s.session.host else 'another machine'}"
        self.status = s.status
        self.phase = s.phase
        self.todo_done, self.todo_total = s.progress.done, s.progress.total
        self.step = {"tool": s.step.tool, "title": s.step.title, "state": s.step.state} if s.step else None
        self.input_tokens, self.output_tokens = s.usage.inputTokens, s.usage.outputTokens
        self.cost = s.costUsd
        self.retry = s.retry.text if s.retry is not None else ""
        if s.result is not None:
            self.result = {"ok": s.result.ok, "summary": s.result.summary, "error": s.result.error}

    def apply_event(self, kind: str, d: dict[str, Any]) -> None:
        """Fold one event into the state."""
        if kind == "retry":
            self.retry = str(d.get("text") or "retrying the API")
            return
        if kind in ("step", "message", "usage", "result", "status"):
            self.retry = ""  # the model answered again (or the run is over)
        if kind == "status":
            self.status = d.get("status", self.status)
            self.phase = d.get("phase", self.phase)
            if isinstance(d.get("demo"), bool):
                self.demo = d["demo"]
        elif kind == "phase":
            self.phase = d.get("phase", self.phase)
        elif kind == "step":
            self.step = d
            if d.get("state") in ("ok", "error"):
                self.steps_done += 1
        elif kind == "todo":
            self.todo_done, self.todo_total = int(d.get("done") or 0), int(d.get("total") or 0)
        elif kind == "usage":
            self.input_tokens = int(d.get("inputTokens") or 0)
            self.output_tokens = int(d.get("outputTokens") or 0)
            if d.get("costUsd") is not None:
                self.cost = d["costUsd"]
        elif kind == "result":
            self.result = d
            if d.get("costUsd") is not None:
                self.cost = d["costUsd"]

    def progress(self) -> tuple[float, float, str]:
        """``(completed, total, label)``: to-dos when known, else the phase's place."""
        if self.status == "succeeded":
            return 1.0, 1.0, "done"
        if self.todo_total > 0:
            return float(self.todo_done), float(self.todo_total), f"{self.todo_done}/{self.todo_total} to-dos"
        index = PHASES.index(self.phase) if self.phase in PHASES else 0
        last = len(PHASES) - 1
        return float(index), float(last), f"phase {index + 1}/{len(PHASES)}"


class PlainRenderer:
    """One line per event and comment on ``out``; notices on ``err``."""

    def __init__(self, job_id: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.view = JobView(job_id)
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._was_live = False

    def __enter__(self) -> PlainRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.flush()

    def _line(self, stream: TextIO, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()  # a pipe reader wants each line as it happens

    def snapshot(self, snapshot: JobSnapshot, *, reason: Literal["joined", "gap"]) -> None:
        self.view.apply_snapshot(snapshot)
        if reason == "gap":
            _, _, label = self.view.progress()
            self._line(self.err, f"progress-service: job state now {snapshot.status}, phase {snapshot.phase}, {label}")

    def event(self, msg: EventMsg) -> None:
        self.view.apply_event(msg.kind, msg.data)
        self._line(self.out, format_event(msg, self.view.job_id))

    def chat(self, msg: ChatMsg) -> None:
        self._line(self.out, format_chat(msg))

    def presence(self, joined: list[str], left: list[str]) -> None:
        self.view.watchers.update(joined)
        self.view.watchers.difference_update(left)

    def connection(self, state: str, detail: str = "") -> None:
        if state == "reconnecting":
            self._line(self.err, f"progress-service: connection lost: {detail}")
        elif state == "live":
            if self._was_live:
                self._line(self.err, "progress-service: reconnected; resuming")
            self._was_live = True

    def notice(self, text: str) -> None:
        self._line(self.err, f"progress-service: {text}")

    def finish(self, status: str, ok: bool) -> None:
        """Say how the job ended (stderr: stdout holds events only)."""
        self._line(self.err, f"progress-service: job {self.view.job_id} {status}")


class RichRenderer:
    """A live panel redrawn in place, with a log of steps and comments above it."""

    def __init__(self, job_id: str, console: Any = None) -> None:
        from rich.console import Console  # noqa: PLC0415 - only a terminal needs rich
        from rich.live import Live  # noqa: PLC0415

        self.view = JobView(job_id)
        self.console = console or Console()
        self._live = Live(console=self.console, refresh_per_second=8, transient=False, get_renderable=self._panel)
        self._was_live = False
        self._prompt_shown = False

    def __enter__(self) -> RichRenderer:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    # -- drawing -------------------------------------------------------

    def _panel(self) -> Any:
        from rich.console import Group  # noqa: PLC0415
        from rich.progress_bar import ProgressBar  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        v = self.view
        completed, total, label = v.progress()
        status_style = {"succeeded": "bold green", "failed": "bold red", "cancelled": "yellow"}.get(v.status, "cyan")
        conn_style = {"live": "green", "reconnecting": "yellow", "offline": "red"}.get(v.connection, "dim")
        head = Text.assemble(
            ("job ", "dim"), (v.job_id, "bold"), "  ", (v.status, status_style),
            ("  [demo replay]" if v.demo else "", "magenta"),
            (f"  [{v.where}]" if v.where else "", "blue"),
            "  ", (f"● {v.connection}", conn_style),
            (f" {v.connection_detail}" if v.connection_detail and v.connection != "live" else "", "dim"),
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total or 1.0, completed=completed, width=40), Text(label))
        step = "-"
        if v.step:
            mark = {"ok": "✓", "error": "✗", "started": "…"}.get(str(v.step.get("state")), "")
            step = f"{mark} {v.step.get('tool')} {one_line(v.step.get('title', ''), 80)}"
        info = Table.grid(padding=(0, 2))
        info.add_row(Text("phase", "dim"), Text(v.phase), Text("step", "dim"), Text(step))
        todos = f"{v.todo_done}/{v.todo_total}" if v.todo_total else "-"
        cost = format_cost(v.cost) or "-"
        info.add_row(
            Text("to-dos", "dim"), Text(todos),
            Text("tokens", "dim"), Text(f"{v.input_tokens} in / {v.output_tokens} out   cost {cost}"),
        )
        if v.retry:
            info.add_row(Text("api", "dim"), Text(v.retry, "yellow"), Text(""), Text(""))
        if v.watchers:
            info.add_row(Text("watching", "dim"), Text(", ".join(sorted(v.watchers))), Text(""), Text(""))
        return Group(head, bar, info)

    def _print(self, *parts: Any) -> None:
        from rich.text import Text  # noqa: PLC0415

        self.console.print(Text.assemble(*parts))

    # -- FollowSink ----------------------------------------------------

    def snapshot(self, snapshot: JobSnapshot, *, reason: Literal["joined", "gap"]) -> None:
        self.view.apply_snapshot(snapshot)
        if not self._prompt_shown and snapshot.prompt:
            self._prompt_shown = True
            self._print(("prompt: ", "dim"), one_line(snapshot.prompt, 200))
        if reason == "gap":
            self._print(("state re-read after missed events: ", "yellow"), f"{snapshot.status}, phase {snapshot.phase}")
        self._live.refresh()

    def event(self, msg: EventMsg) -> None:
        self.view.apply_event(msg.kind, msg.data)
        d = msg.data
        clock = (format_clock(msg.at) + " ", "dim")
        if msg.kind == "step" and d.get("state") in ("ok", "error"):
            ok = d.get("state") == "ok"
            self._print(clock, ("✓ " if ok else "✗ ", "green" if ok else "red"), describe_step(d))
        elif msg.kind == "message":
            self._print(clock, (describe_event("message", d), "italic"))
        elif msg.kind == "log":
            self._print(clock, (describe_event("log", d), "dim red"))
        elif msg.kind == "phase":
            self._print(clock, ("phase ", "dim"), (str(d.get("phase")), "bold"))
        elif msg.kind == "result":
            self._print(clock, ("result ", "bold"), (describe_event("result", d), "green" if d.get("ok") else "red"))
        elif msg.kind == "status" and d.get("status") in TERMINAL_STATUSES | {"running"}:
            self._print(clock, ("status ", "dim"), describe_event("status", d))
        elif msg.kind == "retry":
            self._print(clock, (describe_event("retry", d), "yellow"))
        elif msg.kind == "notice":
            self._print(clock, (describe_event("notice", d), "yellow" if d.get("kind") == "permission_denied" else "dim"))
        elif msg.kind == "worker" and d.get("state") == "lost":
            self._print(clock, ("worker lost ", "yellow"), str(d.get("workerId")))
        elif msg.kind == "instruction":
            self._print(clock, ("instruction ", "bold cyan"), describe_event("instruction", d))
        elif msg.kind == "permission":
            style = "bold yellow" if d.get("state") == "pending" else "yellow"
            self._print(clock, ("permission ", style), describe_permission(d, self.view.job_id))
        self._live.refresh()

    def chat(self, msg: ChatMsg) -> None:
        self._print((format_clock(msg.sentAt) + " ", "dim"), ("💬 " + one_line(msg.userName, 80), "bold cyan"), ": ", one_line(msg.text, 1000))

    def presence(self, joined: list[str], left: list[str]) -> None:
        self.view.watchers.update(joined)
        self.view.watchers.difference_update(left)
        self._live.refresh()

    def connection(self, state: str, detail: str = "") -> None:
        if state == "connecting" and self.view.connection == "reconnecting":
            return  # keep showing why until the join succeeds
        self.view.connection, self.view.connection_detail = state, detail
        if state == "live":
            if self._was_live:
                self._print(("reconnected; resuming", "green"))
            self._was_live = True
        self._live.refresh()

    def notice(self, text: str) -> None:
        self._print((text, "yellow"))

    def finish(self, status: str, ok: bool) -> None:
        """Say how the job ended, under the panel."""
        self.view.status = status if status in TERMINAL_STATUSES else self.view.status
        self.view.connection = "done"
        self._live.refresh()
        self._print(("job ", "dim"), (self.view.job_id, "bold"), " ", (status, "bold green" if ok else "bold red"))


Renderer = PlainRenderer | RichRenderer


def make_renderer(job_id: str, *, plain: bool | None = None) -> Renderer:
    """Rich when stdout is a terminal (unless ``plain``), else plain lines."""
    if plain is None:
        plain = not sys.stdout.isatty()
    if plain:
        # A pipe in a non-UTF-8 locale must not turn one odd character in an
        # agent's message into a crash of the follower.
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="replace")
        return PlainRenderer(job_id)
    return RichRenderer(job_id)
