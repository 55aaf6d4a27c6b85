"""Claude Code stream-json lines -> job events, and the snapshot they lead to.

:class:`Mapper` is fed one output line at a time and returns zero or more
:class:`Mapped` events, each carrying the :class:`JobSnapshot` as it is after
that event (so the worker appends event and snapshot in one MULTI). The line
shapes are in :mod:`worker.stream_json`; a line that is not a JSON object,
or whose known fields have unexpected types, becomes a ``log`` event instead
of an exception, and unknown types and subtypes are ignored.

Phase rules (docs/protocol.md ``phase``): they follow what the agent is
doing now.

- ``starting`` when the run starts (and on the first ``system/init``);
- a tool call moves to its tool's phase: Read/WebFetch/WebSearch/ToolSearch
  (and the old Grep/Glob/LS) -> ``planning``; Edit/Write/NotebookEdit ->
  ``editing``; Bash running a test runner -> ``testing``;
- to-do bookkeeping (TaskCreate/TaskUpdate/TaskList/TaskGet/TodoWrite), a
  Bash command that is not a test run, Agent/Task and any other tool keep
  the current phase: ``git status`` while editing is editing work, and ticking
  a to-do off never sends the job back to ``planning``. Only when nothing
  happened yet (``starting``) or the agent seemed done (``reviewing``) does
  such a call move to ``planning``, so the timeline never stays on
  ``starting`` during work;
- ``reviewing`` when the main agent's message that ends its turn has text
  (the ``end_turn`` stop reason of the streamed ``message_delta``, or of the
  message itself for older output): that is its final answer, to-dos or not;
- ``finishing`` at the ``result`` line.

Why one module of ~560 lines: :class:`Mapper` is one state machine over the
CLI's output (pending tools, live tokens, to-dos, phase, retries) and its
handlers share that state; what does not need it already lives apart
(``stream_json``, ``step_detail``, ``todos``, ``tools``).
"""

from __future__ import annotations

import collections
from pathlib import Path
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import Struct

from progress_service.events import (
    TERMINAL_STATUSES,
    LOG_LINE_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    SUMMARY_MAX_CHARS,
    TITLE_MAX_CHARS,
    CurrentStep,
    JobStatus,
    NoticeKind,
    Phase,
    WorkerState,
    EventData,
    EventKind,
    JobSnapshot,
    LogData,
    MessageData,
    NoticeData,
    PhaseData,
    Progress,
    ResultData,
    RetryData,
    StatusData,
    StepData,
    StepState,
    Usage,
    UsageData,
    WorkerData,
    clip,
)
from progress_service.ids import now_ms
from worker.step_detail import step_input, step_output
from worker.todos import TodoList
from worker.tools import BOOKKEEPING_TOOLS, is_test_command, tool_phase, tool_title  # noqa: F401 - is_test_command re-exported
from worker.stream_json import ApiEvent, Block, Message, StreamLine, TokenUsage, decode_lenient, retry_text

#: Live token counts and tool progress are published at most this often (ms).
LIVE_EVERY_MS = 1000
#: Stderr lines kept to explain a run that ends without a result.
STDERR_TAIL = 5

# --------------------------------------------------------------------------
# The mapper
# --------------------------------------------------------------------------


class Mapped(Struct, kw_only=True):
    """One event to append and the snapshot it leads to."""

    kind: EventKind
    at: int
    data: EventData
    snapshot: JobSnapshot


class _Pending(Struct, kw_only=True):
    tool: str
    title: str
    started: int
    parent: str | None = None
    task_subject: str | None = None
    #: A background subagent: its step ends at ``task_notification``, not at the launch result.
    background: bool = False


class _Live(Struct, kw_only=True):
    """One API message's tokens as they stream in."""

    input: int = 0
    output: int = 0
    estimated_chars: int = 0
    final: bool = False


class Mapper:
    """Stateful translation of one run's output into job events.

    Never mutates a nested struct of the snapshot in place: each change
    builds new ones, so the shallow copy stored with each event stays valid.
    """

    def __init__(
        self, snapshot: JobSnapshot, *, clock: Callable[[], int] = now_ms, stdout_copy: Path | None = None
    ) -> None:
        self.snapshot = snapshot
        self.clock = clock
        #: Every stdout line fed is appended here as well (``PS_CLAUDE_STDOUT_DIR``).
        self.stdout_copy = stdout_copy
        self._pending: dict[str, _Pending] = {}
        self._todos = TodoList()
        self._live: dict[str, _Live] = {}
        self._streaming: str | None = None  # id of the main agent's message being streamed
        self._streamed_text = False
        self._anon_messages = 0
        self._tools_used = 0
        self._inited = False
        self._last_live = 0
        self._last_progress: dict[str, int] = {}
        self._tasks: dict[str, tuple[str, bool]] = {}  # task id -> (its step id, is a subagent)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        #: The last ``result`` line, once seen.
        self.result: ResultData | None = None
        self.result_is_error: bool | None = None

    # -- helpers ------------------------------------------------------------

    def _emit(self, out: list[Mapped], kind: EventKind, data: EventData, **changes: Any) -> None:
        if changes:
            self.snapshot = msgspec.structs.replace(self.snapshot, **changes)
        out.append(Mapped(kind=kind, at=self.clock(), data=data, snapshot=msgspec.structs.replace(self.snapshot)))

    def _phase(self, out: list[Mapped], phase: Phase) -> None:
        if phase != self.snapshot.phase:
            at = self.clock()
            self._emit(out, "phase", PhaseData(phase=phase, since=at), phase=phase)

    def _log(self, out: list[Mapped], stream: str, line: str) -> None:
        self._emit(out, "log", LogData(stream=stream, line=clip(line, LOG_LINE_MAX_CHARS)))

    def _notice(self, out: list[Mapped], kind: NoticeKind, text: str, step: str | None = None) -> None:
        self._emit(out, "notice", NoticeData(kind=kind, text=clip(text, MESSAGE_MAX_CHARS), stepId=step))

    def _todo_event(self, out: list[Mapped]) -> None:
        data = self._todos.data()
        self._emit(out, "todo", data, progress=Progress(done=data.done, total=data.total))

    def _answered(self) -> None:
        """The model answered: a pending retry is over."""
        if self.snapshot.retry is not None:
            self.snapshot = msgspec.structs.replace(self.snapshot, retry=None)

    # -- lifecycle events the worker asks for ---------------------------------

    def status(self, status: JobStatus, *, reason: str | None = None, **changes: Any) -> list[Mapped]:
        """A ``status`` event (running, succeeded, failed, cancelled, queued)."""
        out: list[Mapped] = []
        if status == "running":
            data = StatusData(status="running", phase=self.snapshot.phase, demo=changes.get("demo"))
            self._emit(out, "status", data, status="running", **changes)
            self._phase(out, "starting")
            return out
        if status in TERMINAL_STATUSES:
            changes.setdefault("finishedAt", self.clock())
        changes["step"] = None
        changes["retry"] = None
        self.snapshot = msgspec.structs.replace(self.snapshot, status=status, reason=reason, **changes)
        data = StatusData(status=status, phase=self.snapshot.phase, reason=reason)
        self._emit(out, "status", data)
        return out

    def worker(self, state: WorkerState, worker_id: str) -> list[Mapped]:
        """A ``worker`` liveness event."""
        out: list[Mapped] = []
        self._emit(out, "worker", WorkerData(state=state, workerId=worker_id))
        return out

    def event(self, kind: EventKind, data: EventData) -> list[Mapped]:
        """An event the worker makes itself (``instruction``, ``permission``) with the current snapshot."""
        out: list[Mapped] = []
        self._emit(out, kind, data)
        return out

    def log(self, stream: str, line: str) -> list[Mapped]:
        """A bounded ``log`` event (stderr lines, oversize stdout lines)."""
        out: list[Mapped] = []
        if stream == "stderr" and line.strip():
            self.stderr_tail.append(clip(line.strip(), 500))
        self._log(out, stream, line)
        return out

    # -- stream-json ----------------------------------------------------------

    def feed(self, raw: bytes | str) -> list[Mapped]:
        """Map one stdout line; never raises on bad input."""
        out: list[Mapped] = []
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if self.stdout_copy is not None:
            self._copy(text)
        if not text.strip():
            return out
        try:
            line, dropped = decode_lenient(raw)
        except msgspec.ValidationError:
            self._log(out, "stdout", f"unrecognized non-object JSON: {text}")
            return out
        except msgspec.DecodeError:
            self._log(out, "stdout", text)
            return out
        if dropped:
            # A known field of an unexpected shape (a newer CLI?): say so, map the rest.
            self._log(out, "stdout", f"unrecognized {', '.join(dropped)} in '{line.type}' line: {text}")
        message = line.message if isinstance(line.message, Message) else None
        if line.type == "system":
            self._system(out, line)
        elif line.type == "stream_event" and line.event is not None:
            if line.parent_tool_use_id is None:
                self._stream_event(out, line.event)
        elif line.type == "assistant" and message is not None:
            self._assistant(out, message, line.parent_tool_use_id)
        elif line.type == "user" and message is not None:
            self._user(out, message, line.parent_tool_use_id)
        elif line.type == "tool_progress":
            self._tool_progress(out, line)
        elif line.type == "rate_limit_event" and line.rate_limit_info is not None:
            info = line.rate_limit_info
            if info.status and info.status != "allowed":
                what = f"rate limit{' (' + info.rateLimitType + ')' if info.rateLimitType else ''}: {info.status}"
                if info.utilization is not None:
                    what += f", {info.utilization:.0%} used"
                self._notice(out, "rate_limit", what)
        elif line.type == "result":
            self._result(out, line)
        # Anything else (newer line types): ignored.
        return out

    def _copy(self, text: str) -> None:
        if self.stdout_copy is None:
            return
        try:
            with self.stdout_copy.open("a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        except OSError:
            self.stdout_copy = None  # a debugging aid must never fail a job

    def _system(self, out: list[Mapped], line: StreamLine) -> None:
        sub = line.subtype or ""
        if sub == "init":
            if not self._inited:
                self._inited = True
                self._phase(out, "starting")
            if line.model and not self.snapshot.model:
                self.snapshot = msgspec.structs.replace(self.snapshot, model=line.model)
        elif sub == "api_retry":
            self._retry(out, line)
        elif sub == "status":
            if line.status == "compacting":
                self._notice(out, "compact", "compacting the conversation")
        elif sub == "compact_boundary":
            meta = line.compact_metadata
            text = "conversation compacted"
            if meta is not None and meta.trigger:
                text += f" ({meta.trigger}" + (f", {meta.pre_tokens} tokens before" if meta.pre_tokens else "") + ")"
            self._notice(out, "compact", text)
        elif sub == "permission_denied":
            reason = line.message if isinstance(line.message, str) else ""
            text = f"permission denied: {line.tool_name or 'tool'}" + (f": {reason}" if reason else "")
            self._notice(out, "permission_denied", text, line.tool_use_id)
        elif sub == "hook_response":
            name = line.hook_name or line.hook_event or "hook"
            text = f"hook {name}: {line.outcome or 'done'}"
            if line.exit_code not in (None, 0):
                text += f" (exit {line.exit_code})" + (f": {line.stderr.strip()}" if line.stderr and line.stderr.strip() else "")
            self._notice(out, "hook", text)
        elif sub.startswith("task_"):
            self._task(out, line)

    def _retry(self, out: list[Mapped], line: StreamLine) -> None:
        attempt, most, delay = line.attempt or 0, line.max_retries or 0, line.retry_delay_ms or 0
        data = RetryData(
            attempt=attempt,
            maxRetries=most,
            delayMs=delay,
            errorStatus=line.error_status,
            error=clip(line.error or "", TITLE_MAX_CHARS),
            text=retry_text(attempt, most, delay, line.error_status, line.error or ""),
        )
        self._emit(out, "retry", data, retry=data)

    def _task(self, out: list[Mapped], line: StreamLine) -> None:
        """``task_*``: a subagent (or background shell) the CLI runs beside the main loop."""
        known_step, known_agent = self._tasks.get(line.task_id or "", (None, None))
        step = line.tool_use_id or known_step
        # A foreground shell is a task too (local_bash): its step says it all.
        agent = known_agent if line.task_type is None and known_agent is not None else line.task_type in (None, "local_agent")
        if line.subtype == "task_started":
            if line.task_id and step:
                self._tasks[line.task_id] = (step, agent)
            if step in self._pending and line.is_backgrounded:
                self._pending[step].background = True
            if agent or line.is_backgrounded:
                what = "subagent" if agent else "background task"
                self._notice(out, "subagent", f"{what} started: {line.description or ''}".rstrip(": "), step)
        elif line.subtype == "task_progress" and step in self._pending:
            pending = self._pending[step]
            if line.description:
                pending.title = clip(f"{pending.title.split(' — ')[0]} — {line.description}", TITLE_MAX_CHARS)
            self._progress(out, step, pending, force=bool(line.description))
        elif line.subtype == "task_notification":
            ok = line.status in (None, "completed")
            launched = self._pending.get(step or "")
            background = launched is not None and launched.background
            if agent or background:
                summary = clip((line.summary or "").strip(), MESSAGE_MAX_CHARS)
                what = "subagent" if agent else "background task"
                self._notice(out, "subagent", f"{what} {line.status or 'finished'}" + (f": {summary}" if summary else ""), step)
            if step and background:
                self._end_step(out, step, error=not ok)

    def _progress(self, out: list[Mapped], step_id: str, pending: _Pending, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_progress.get(step_id, 0) < LIVE_EVERY_MS:
            return
        self._last_progress[step_id] = now
        data = StepData(
            stepId=step_id, tool=pending.tool, title=pending.title, state="started",
            parentStepId=pending.parent, elapsedMs=now - pending.started,
        )
        self._emit(out, "step", data, step=self._current(step_id, pending, "started"))

    def _tool_progress(self, out: list[Mapped], line: StreamLine) -> None:
        pending = self._pending.get(line.tool_use_id or "")
        if pending is not None and line.tool_use_id:
            self._progress(out, line.tool_use_id, pending)

    # -- tokens -----------------------------------------------------------

    def _live_usage(self, out: list[Mapped], *, force: bool) -> None:
        """Publish the running token counts, at most once a second unless ``force``."""
        inp = sum(m.input for m in self._live.values())
        # Streamed text is estimated low (6 characters a token) so the count
        # only grows when the message's real number arrives.
        outp = sum(m.output if m.final else max(m.output, m.estimated_chars // 6) for m in self._live.values())
        usage = self.snapshot.usage
        if inp <= usage.inputTokens and outp <= usage.outputTokens:
            return
        now = self.clock()
        if not force and now - self._last_live < LIVE_EVERY_MS:
            return
        self._last_live = now
        # Never down while running (a turn after a result starts from the
        # result's session totals); the next result line sets exact totals.
        new = msgspec.structs.replace(
            usage, inputTokens=max(inp, usage.inputTokens), outputTokens=max(outp, usage.outputTokens)
        )
        data = UsageData(inputTokens=new.inputTokens, outputTokens=new.outputTokens, costUsd=self.snapshot.costUsd)
        self._emit(out, "usage", data, usage=new)

    def _stream_event(self, out: list[Mapped], event: ApiEvent) -> None:
        """The main agent's raw API events: live tokens, and the end of its turn."""
        if event.type == "message_start" and event.message is not None:
            self._answered()
            key = event.message.id or f"anon-{self._anon_messages}"
            self._anon_messages += event.message.id is None
            usage = event.message.usage or TokenUsage()
            self._live[key] = _Live(input=usage.total_input, output=usage.output_tokens)
            self._streaming, self._streamed_text = key, False
            self._live_usage(out, force=True)
        elif event.type == "content_block_delta" and event.delta is not None and self._streaming in self._live:
            d = event.delta
            self._streamed_text |= d.type == "text_delta" and bool((d.text or "").strip())
            self._live[self._streaming].estimated_chars += len(d.text or d.partial_json or d.thinking or "")
            self._live_usage(out, force=False)
        elif event.type == "message_delta" and self._streaming in self._live:
            live = self._live[self._streaming]
            if event.usage is not None:
                live.output, live.final = max(live.output, event.usage.output_tokens), True
            self._live_usage(out, force=True)
            stop = event.delta.stop_reason if event.delta is not None else None
            if stop == "end_turn" and self._streamed_text and not self._main_pending():
                self._phase(out, "reviewing")

    def _main_pending(self) -> bool:
        return any(p.parent is None and not p.background for p in self._pending.values())

    # -- messages and tools -------------------------------------------------

    def _assistant(self, out: list[Mapped], message: Message, parent: str | None) -> None:
        blocks = message.content if isinstance(message.content, list) else []
        if isinstance(message.content, str) and message.content:
            blocks = [_text_block(message.content)]
        if message.model != "<synthetic>":
            self._answered()
        for block in blocks:
            if block.type == "tool_use" and block.id and block.name:
                self._tool_use(out, block.id, block.name, block.input if isinstance(block.input, dict) else {}, parent)
            elif block.type == "text" and block.text and block.text.strip() and parent is None:
                # Output without stream events (older CLIs, the replay
                # transcripts): the message's own stop reason tells the end.
                work_done = self.snapshot.progress.total > 0 and (
                    self.snapshot.progress.done == self.snapshot.progress.total
                )
                if not self._main_pending() and self._tools_used and (work_done or message.stop_reason == "end_turn"):
                    self._phase(out, "reviewing")
                self._emit(out, "message", MessageData(text=clip(block.text.strip(), MESSAGE_MAX_CHARS)))
        key = message.id or f"anon-{self._anon_messages}"
        if message.usage is not None and message.model != "<synthetic>" and key not in self._live:
            # Not streamed (a subagent's message, or no --include-partial-messages):
            # the line's usage is all there is. One API message arrives as
            # several lines repeating its usage: each id counts once.
            self._anon_messages += message.id is None
            self._live[key] = _Live(input=message.usage.total_input, output=message.usage.output_tokens)
            self._live_usage(out, force=True)

    def _current(self, step_id: str, pending: _Pending, state: str) -> CurrentStep:
        return CurrentStep(
            stepId=step_id, tool=pending.tool, title=pending.title, state=state,
            startedAt=pending.started, parentStepId=pending.parent,
        )

    def _tool_use(self, out: list[Mapped], tool_id: str, tool: str, tool_input: dict[str, Any], parent: str | None) -> None:
        self._tools_used += 1
        if tool in BOOKKEEPING_TOOLS:
            if self.snapshot.phase in ("queued", "starting"):
                self._phase(out, "planning")
        else:
            self._phase(out, tool_phase(tool, tool_input, self.snapshot.phase))
        title = tool_title(tool, tool_input)
        at = self.clock()
        pending = _Pending(tool=tool, title=title, started=at, parent=parent)
        self._pending[tool_id] = pending
        step = self._current(tool_id, pending, "started")
        data = StepData(
            stepId=tool_id, tool=tool, title=title, state="started",
            input=step_input(tool, tool_input), parentStepId=parent,
        )
        self._emit(out, "step", data, step=step)
        changed, guessed = self._todos.apply(tool, tool_input)
        pending.task_subject = guessed
        if changed:
            self._todo_event(out)

    def _user(self, out: list[Mapped], message: Message, parent: str | None) -> None:
        if not isinstance(message.content, list):
            return
        for block in message.content:
            if block.type != "tool_result" or not block.tool_use_id:
                continue
            pending = self._pending.get(block.tool_use_id)
            if pending is not None and pending.background:
                continue  # "Async agent launched": the step ends with its task
            if pending and pending.task_subject is not None:
                self._todos.created(pending.task_subject, block.content)
            self._end_step(out, block.tool_use_id, error=bool(block.is_error), content=block.content, parent=parent)

    def _end_step(
        self, out: list[Mapped], step_id: str, *, error: bool, content: Any = None, parent: str | None = None
    ) -> None:
        popped = self._pending.pop(step_id, None)
        self._last_progress.pop(step_id, None)
        now = self.clock()
        pending = popped or _Pending(tool="unknown", title="", started=now, parent=parent)
        state: StepState = "error" if error else "ok"
        duration = now - pending.started if pending.tool != "unknown" else None
        result = step_output(pending.tool, content, error)
        data = StepData(
            stepId=step_id, tool=pending.tool, title=pending.title, state=state, durationMs=duration,
            output=result.output, outputChars=result.outputChars, exitCode=result.exitCode,
            error=result.error, parentStepId=pending.parent,
        )
        step = self._current(step_id, pending, state)
        if pending.tool == "unknown":
            step = msgspec.structs.replace(step, startedAt=None)
        self._emit(out, "step", data, step=step)

    # -- the end of a turn ----------------------------------------------------

    def _result(self, out: list[Mapped], line: StreamLine) -> None:
        """A ``result`` line: a turn of the session ended (a session woken by a
        background task prints one per turn; the last one is the job's)."""
        self._phase(out, "finishing")
        self._answered()  # whatever was being retried is over
        is_error = bool(line.is_error)
        cost = float(line.total_cost_usd or 0.0)  # the session's running total
        usage = self.snapshot.usage
        if line.usage is not None or line.modelUsage:
            # ``modelUsage`` holds the session's totals, subagents included;
            # ``usage`` only this turn's main loop. The larger of each wins,
            # so a partial ``modelUsage`` never hides ``usage``.
            models = (line.modelUsage or {}).values()
            turn = line.usage or TokenUsage()
            usage = Usage(
                inputTokens=max(turn.total_input, sum(m.total_input for m in models)),
                outputTokens=max(turn.output_tokens, sum(m.outputTokens for m in models)),
            )
        self._emit(
            out,
            "usage",
            UsageData(inputTokens=usage.inputTokens, outputTokens=usage.outputTokens, costUsd=cost),
            usage=usage,
            costUsd=cost,
        )
        text = (line.result or "").strip()
        error = None
        if is_error:
            # Every cause the CLI gives: the result text (API errors) and the
            # ``errors`` list (max turns, execution errors).
            causes = [c for c in [text, *(e.strip() for e in line.errors or ())] if c]
            error = "; ".join(dict.fromkeys(causes)) or (line.subtype or "error")
            if line.subtype and line.subtype != "success":
                error = f"{line.subtype}: {error}" if line.subtype not in error else error
            error = clip(error, SUMMARY_MAX_CHARS)
        result = ResultData(
            ok=not is_error,
            turns=int(line.num_turns or 0),
            durationMs=int(line.duration_ms or 0),
            costUsd=cost,
            summary=clip(text, SUMMARY_MAX_CHARS),
            error=error,
        )
        self.result = result
        self.result_is_error = is_error
        self._emit(out, "result", result, result=result)

    def no_result_reason(self, returncode: int | None) -> str:
        """Why a run that printed no ``result`` failed: its exit code and stderr's last lines."""
        reason = f"exited with code {returncode} and no result"
        if self.stderr_tail:
            reason += ": " + " | ".join(self.stderr_tail)
        return clip(reason, SUMMARY_MAX_CHARS)


def _text_block(text: str) -> Block:
    return Block(type="text", text=text)
