"""Claude Code stream-json lines -> job events, and the snapshot they lead to.

:class:`Mapper` is fed one output line at a time and returns zero or more
:class:`Mapped` events, each carrying the :class:`JobSnapshot` as it is after
that event (so the worker appends event and snapshot in one MULTI).

Decoding is tolerant on purpose: the Structs below name only the fields we
use, unknown ``type``s and fields are ignored (newer CLI versions add them),
and a line that is not a JSON object, or whose known fields have unexpected
types, becomes a ``log`` event instead of an exception.

Phase rules (PROTOCOL.md ``phase``):

- ``starting`` when the run starts (and on ``system/init``);
- a tool call moves to its tool's phase: Read/Grep/Glob/LS/TodoWrite/Task*/
  WebFetch/WebSearch -> ``planning``; Edit/MultiEdit/Write/NotebookEdit ->
  ``editing``; Bash running a test runner -> ``testing``;
- a Bash command that is not a test run, and any other tool (MCP tools...),
  keeps the current phase: ``git status`` while planning is planning work,
  ``npm install`` while editing is editing work. Only when nothing happened
  yet (``starting``) or the agent seemed done (``reviewing``) does it move to
  ``planning``, so the timeline never stays on ``starting`` during work;
- ``reviewing`` when the agent writes text while no tool call is pending and
  it is done with its work (every to-do completed, or the message ended the
  turn): that is its final answer;
- ``finishing`` at the ``result`` line.
"""

from __future__ import annotations

import re
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
    JobSnapshot,
    LogData,
    MessageData,
    PhaseData,
    Progress,
    ResultData,
    StatusData,
    StepData,
    TodoData,
    TodoItem,
    Usage,
    UsageData,
    WorkerData,
    clip,
    now_ms,
)
from worker.step_detail import step_input, step_output

# --------------------------------------------------------------------------
# Tolerant stream-json shapes (only the fields we read)
# --------------------------------------------------------------------------


class TokenUsage(Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total_input(self) -> int:
        # Cached prompt tokens are input the model read; they are billed too.
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


class Block(Struct, kw_only=True):
    """A content block: text, thinking, tool_use or tool_result."""

    type: str = ""
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: Any = None
    is_error: bool | None = None


class Message(Struct, kw_only=True):
    id: str | None = None
    content: list[Block] | str | None = None
    usage: TokenUsage | None = None
    stop_reason: str | None = None


class StreamLine(Struct, kw_only=True):
    """Any stream-json line; ``type`` picks which fields matter."""

    type: str = ""
    subtype: str | None = None
    session_id: str | None = None
    model: str | None = None
    message: Message | None = None
    parent_tool_use_id: str | None = None
    # result
    is_error: bool | None = None
    duration_ms: int | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    usage: TokenUsage | None = None
    result: str | None = None


_line_dec = msgspec.json.Decoder(StreamLine)
_any_dec = msgspec.json.Decoder()

# --------------------------------------------------------------------------
# Tool classification
# --------------------------------------------------------------------------

PLANNING_TOOLS = frozenset({"Read", "Grep", "Glob", "LS", "TodoWrite", "WebFetch", "WebSearch", "NotebookRead"})
EDITING_TOOLS = frozenset({"Edit", "MultiEdit", "Write", "NotebookEdit"})

#: Commands that run a test suite (matched as words anywhere in the command,
#: so ``cd app && uv run pytest -q`` counts).
_TEST_RE = re.compile(
    r"(?:^|[\s;&|(])(?:"
    r"pytest|py\.test|tox|nox|jest|vitest|mocha|ava|rspec|phpunit|ctest"
    r"|python[0-9.]*\s+-m\s+(?:pytest|unittest)"
    r"|(?:npm|pnpm|yarn|bun)\s+(?:run\s+)?test"
    r"|go\s+test|cargo\s+(?:test|nextest)|make\s+(?:test|check)|mvn\s+test|gradle\w*\s+test|dotnet\s+test"
    r"|mix\s+test|deno\s+test|bundle\s+exec\s+rspec"
    r")(?=$|[\s;&|)])"
)


def is_test_command(command: str) -> bool:
    """True when a shell command runs a test runner."""
    return bool(_TEST_RE.search(command))


def tool_phase(tool: str, tool_input: dict[str, Any], current: str) -> str:
    """The phase a tool call puts the job in (see the module docstring)."""
    if tool in PLANNING_TOOLS or tool.startswith("Task"):
        return "planning"
    if tool in EDITING_TOOLS:
        return "editing"
    if tool == "Bash" and is_test_command(str(tool_input.get("command", ""))):
        return "testing"
    if current in ("queued", "starting", "reviewing", "finishing"):
        return "planning"
    return current


def tool_title(tool: str, tool_input: dict[str, Any]) -> str:
    """A short human title for a tool call: a path, a command, a pattern."""
    for key in ("file_path", "notebook_path", "path"):
        if tool in EDITING_TOOLS | {"Read", "LS", "NotebookRead"} and isinstance(tool_input.get(key), str):
            return clip(tool_input[key], TITLE_MAX_CHARS)
    if tool == "Bash":
        command = str(tool_input.get("command", "")).strip()
        first = command.splitlines()[0] if command else ""
        if first != command:
            first += " …"
        return clip(first, 120)
    for key in ("pattern", "url", "query", "description", "subject", "prompt"):
        value = tool_input.get(key)
        if isinstance(value, str) and value:
            return clip(value.splitlines()[0], TITLE_MAX_CHARS)
    if tool == "TodoWrite":
        return "update to-do list"
    return clip(tool, TITLE_MAX_CHARS)


_TODO_STATES = {"pending", "in_progress", "completed"}
_TASK_ID_RE = re.compile(r"#\s*([A-Za-z0-9_-]+)")

# --------------------------------------------------------------------------
# The mapper
# --------------------------------------------------------------------------


class Mapped(Struct, kw_only=True):
    """One event to append and the snapshot it leads to."""

    kind: str
    at: int
    data: Struct
    snapshot: JobSnapshot


class _Pending(Struct, kw_only=True):
    tool: str
    title: str
    started: int
    task_subject: str | None = None


class Mapper:
    """Stateful translation of one run's output into job events.

    Never mutates a nested struct of the snapshot in place: each change
    builds new ones, so the shallow copy stored with each event stays valid.
    """

    def __init__(self, snapshot: JobSnapshot, *, clock: Callable[[], int] = now_ms) -> None:
        self.snapshot = snapshot
        self.clock = clock
        #: The final ``result`` line, once seen.
        self.result: ResultData | None = None
        self.result_is_error: bool | None = None
        self._pending: dict[str, _Pending] = {}
        self._todos: list[tuple[str, TodoItem]] = []  # (task id, item)
        self._next_task = 1
        self._usage_by_message: dict[str, TokenUsage] = {}
        self._anon_messages = 0
        self._tools_used = 0
        #: ``parent_tool_use_id`` of the line being mapped (subagent steps).
        self._parent: str | None = None

    # -- helpers ------------------------------------------------------------

    def _emit(self, out: list[Mapped], kind: str, data: Struct, **changes: Any) -> None:
        if changes:
            self.snapshot = msgspec.structs.replace(self.snapshot, **changes)
        out.append(Mapped(kind=kind, at=self.clock(), data=data, snapshot=msgspec.structs.replace(self.snapshot)))

    def _phase(self, out: list[Mapped], phase: str) -> None:
        if phase != self.snapshot.phase:
            at = self.clock()
            self._emit(out, "phase", PhaseData(phase=phase, since=at), phase=phase)  # type: ignore[arg-type]

    def _log(self, out: list[Mapped], stream: str, line: str) -> None:
        self._emit(out, "log", LogData(stream=stream, line=clip(line, LOG_LINE_MAX_CHARS)))

    def _todo_event(self, out: list[Mapped]) -> None:
        items = [item for _, item in self._todos]
        done = sum(1 for i in items if i.state == "completed")
        data = TodoData(items=items, done=done, total=len(items))
        self._emit(out, "todo", data, progress=Progress(done=done, total=len(items)))

    # -- lifecycle events the worker asks for ---------------------------------

    def status(self, status: str, *, reason: str | None = None, **changes: Any) -> list[Mapped]:
        """A ``status`` event (running, succeeded, failed, cancelled, queued)."""
        out: list[Mapped] = []
        if status == "running":
            self._emit(out, "status", StatusData(status="running", phase=self.snapshot.phase), status="running", **changes)
            self._phase(out, "starting")
            return out
        if status in TERMINAL_STATUSES:
            changes.setdefault("finishedAt", self.clock())
        changes["step"] = None
        self.snapshot = msgspec.structs.replace(self.snapshot, status=status, reason=reason, **changes)
        data = StatusData(status=status, phase=self.snapshot.phase, reason=reason)  # type: ignore[arg-type]
        self._emit(out, "status", data)
        return out

    def worker(self, state: str, worker_id: str) -> list[Mapped]:
        """A ``worker`` liveness event."""
        out: list[Mapped] = []
        self._emit(out, "worker", WorkerData(state=state, workerId=worker_id))  # type: ignore[arg-type]
        return out

    def log(self, stream: str, line: str) -> list[Mapped]:
        """A bounded ``log`` event (stderr lines, oversize stdout lines)."""
        out: list[Mapped] = []
        self._log(out, stream, line)
        return out

    # -- stream-json ----------------------------------------------------------

    def feed(self, raw: bytes | str) -> list[Mapped]:
        """Map one stdout line; never raises on bad input."""
        out: list[Mapped] = []
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            return out
        try:
            line = _line_dec.decode(raw)
        except msgspec.ValidationError:
            # JSON, but not an object, or a known field of an unexpected type.
            try:
                value = _any_dec.decode(raw)
            except msgspec.DecodeError:
                value = None
            what = f"'{value.get('type')}' line" if isinstance(value, dict) else "non-object JSON"
            self._log(out, "stdout", f"unrecognized {what}: {text}")
            return out
        except msgspec.DecodeError:
            self._log(out, "stdout", text)
            return out
        self._parent = line.parent_tool_use_id
        if line.type == "system":
            if line.subtype == "init":
                self._phase(out, "starting")
                if line.model and not self.snapshot.model:
                    self.snapshot = msgspec.structs.replace(self.snapshot, model=line.model)
        elif line.type == "assistant" and line.message is not None:
            self._assistant(out, line.message)
        elif line.type == "user" and line.message is not None:
            self._user(out, line.message)
        elif line.type == "result":
            self._result(out, line)
        # Anything else (stream_event, rate_limit_event, newer types): ignored.
        return out

    def _assistant(self, out: list[Mapped], message: Message) -> None:
        blocks = message.content if isinstance(message.content, list) else []
        if isinstance(message.content, str) and message.content:
            blocks = [Block(type="text", text=message.content)]
        for block in blocks:
            if block.type == "tool_use" and block.id and block.name:
                self._tool_use(out, block.id, block.name, block.input if isinstance(block.input, dict) else {})
            elif block.type == "text" and block.text and block.text.strip():
                work_done = self.snapshot.progress.total > 0 and (
                    self.snapshot.progress.done == self.snapshot.progress.total
                )
                if not self._pending and self._tools_used and (work_done or message.stop_reason == "end_turn"):
                    self._phase(out, "reviewing")
                self._emit(out, "message", MessageData(text=clip(block.text.strip(), MESSAGE_MAX_CHARS)))
        if message.usage is not None:
            # One API message arrives as several lines (one per block), each
            # repeating the message's usage: count each message id once.
            key = message.id or f"anon-{self._anon_messages}"
            if message.id is None:
                self._anon_messages += 1
            self._usage_by_message[key] = message.usage
            inp = sum(u.total_input for u in self._usage_by_message.values())
            outp = sum(u.output_tokens for u in self._usage_by_message.values())
            if (inp, outp) != (self.snapshot.usage.inputTokens, self.snapshot.usage.outputTokens):
                self._emit(
                    out,
                    "usage",
                    UsageData(inputTokens=inp, outputTokens=outp, costUsd=self.snapshot.costUsd),
                    usage=Usage(inputTokens=inp, outputTokens=outp),
                )

    def _tool_use(self, out: list[Mapped], tool_id: str, tool: str, tool_input: dict[str, Any]) -> None:
        self._tools_used += 1
        self._phase(out, tool_phase(tool, tool_input, self.snapshot.phase))
        title = tool_title(tool, tool_input)
        at = self.clock()
        pending = _Pending(tool=tool, title=title, started=at)
        self._pending[tool_id] = pending
        step = CurrentStep(stepId=tool_id, tool=tool, title=title, state="started", startedAt=at)
        data = StepData(
            stepId=tool_id, tool=tool, title=title, state="started",
            input=step_input(tool, tool_input), parentStepId=self._parent,
        )
        self._emit(out, "step", data, step=step)
        if tool == "TodoWrite" and isinstance(tool_input.get("todos"), list):
            self._todos = []
            for n, raw in enumerate(tool_input["todos"], 1):
                if isinstance(raw, dict):
                    text = str(raw.get("content") or raw.get("activeForm") or "")
                    state = raw.get("status") if raw.get("status") in _TODO_STATES else "pending"
                    self._todos.append((str(raw.get("id", n)), TodoItem(text=clip(text, TITLE_MAX_CHARS), state=state)))
            self._todo_event(out)
        elif tool == "TaskCreate":
            # The task id is assigned by the tool; Claude Code numbers tasks
            # 1, 2, ... in creation order, and the result ("Task #3 created")
            # corrects our guess if it differs.
            subject = str(tool_input.get("subject") or tool_input.get("description") or "")
            task_id = str(self._next_task)
            self._next_task += 1
            pending.task_subject = task_id
            self._todos.append((task_id, TodoItem(text=clip(subject, TITLE_MAX_CHARS), state="pending")))
            self._todo_event(out)
        elif tool == "TaskUpdate":
            task_id = str(tool_input.get("taskId", tool_input.get("id", "")))
            status = tool_input.get("status")
            subject = tool_input.get("subject")
            for i, (tid, item) in enumerate(self._todos):
                if tid != task_id:
                    continue
                if status == "deleted":
                    del self._todos[i]
                else:
                    new_state = status if status in _TODO_STATES else item.state
                    new_text = clip(subject, TITLE_MAX_CHARS) if isinstance(subject, str) and subject else item.text
                    self._todos[i] = (tid, TodoItem(text=new_text, state=new_state))
                self._todo_event(out)
                break

    def _user(self, out: list[Mapped], message: Message) -> None:
        if not isinstance(message.content, list):
            return
        for block in message.content:
            if block.type != "tool_result" or not block.tool_use_id:
                continue
            pending = self._pending.pop(block.tool_use_id, None)
            now = self.clock()
            tool = pending.tool if pending else "unknown"
            title = pending.title if pending else ""
            state = "error" if block.is_error else "ok"
            duration = now - pending.started if pending else None
            if pending and pending.task_subject is not None:
                self._fix_task_id(pending.task_subject, block.content)
            result = step_output(tool, block.content, bool(block.is_error))
            data = StepData(
                stepId=block.tool_use_id, tool=tool, title=title, state=state, durationMs=duration,
                output=result.output, outputChars=result.outputChars, exitCode=result.exitCode,
                error=result.error, parentStepId=self._parent,
            )
            step = CurrentStep(
                stepId=block.tool_use_id, tool=tool, title=title, state=state,
                startedAt=pending.started if pending else None,
            )
            self._emit(out, "step", data, step=step)

    def _fix_task_id(self, guessed: str, content: Any) -> None:
        text = content if isinstance(content, str) else str(content)
        match = _TASK_ID_RE.search(text)
        if match and match.group(1) != guessed:
            self._todos = [((match.group(1) if tid == guessed else tid), item) for tid, item in self._todos]

    def _result(self, out: list[Mapped], line: StreamLine) -> None:
        self._phase(out, "finishing")
        is_error = bool(line.is_error)
        cost = float(line.total_cost_usd or 0.0)
        usage = self.snapshot.usage
        if line.usage is not None:
            usage = Usage(inputTokens=line.usage.total_input, outputTokens=line.usage.output_tokens)
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
            error = clip(text or (line.subtype or "error"), SUMMARY_MAX_CHARS)
            if line.subtype and line.subtype != "success" and line.subtype not in error:
                error = clip(f"{line.subtype}: {error}", SUMMARY_MAX_CHARS)
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
