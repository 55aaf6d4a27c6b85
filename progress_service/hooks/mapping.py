"""Claude Code hook bodies -> job events, and the snapshot they lead to.

A session job's events are the worker's (``events.py``): the session starts
``running``; each prompt is a ``turn``; a PreToolUse/PostToolUse pair is a
``step`` (``started``, then ``ok``/``error`` with its duration); TodoWrite
inputs and TaskCreated/TaskCompleted/TaskUpdate are ``todo`` lists;
SubagentStart/Stop are steps their tool calls nest under (``parentStepId``);
``Stop`` ends the turn as ``succeeded`` (a later prompt reopens it),
``StopFailure`` as ``failed``, ``SessionEnd`` closes the session for good.
A ``<task-notification>`` the CLI submits as a prompt of its own (a subagent
or background task reporting back, which the CLI then answers with a model
round) is a ``subagent`` notice, not a user's turn; its round still ends
with a ``Stop``.

Hooks carry no sequence numbers, and the CLI may deliver one twice, so
:class:`HookMapper` keeps a small :class:`SessionState` (stored in Redis
between posts) and applies these rules:

- a retried delivery maps to nothing: tool hooks are keyed by
  ``tool_use_id``, subagents by ``agent_id``, tasks by ``task_id``, a prompt
  by its hash while its turn is open, ``Stop`` by its turn, anything else by
  the hash of its body among the last ones seen;
- a PostToolUse whose PreToolUse has not arrived publishes the ``started``
  step first, and the late PreToolUse then maps to nothing;
- anything before ``SessionStart`` starts the session; nothing but a new
  ``SessionStart`` (a resume) follows ``SessionEnd``.

Why one module of ~460 lines: :class:`HookMapper` is one state machine over a
session's hook bodies, one short handler per hook event, all sharing the
:class:`SessionState` the rules above keep; what needs no state already lives
apart (``hooks.body``, ``worker.tools``, ``worker.step_detail``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct

from progress_service.events import (
    LOG_LINE_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    TERMINAL_STATUSES,
    TITLE_MAX_CHARS,
    CurrentStep,
    JobSnapshot,
    LogData,
    MessageData,
    NoticeData,
    PhaseData,
    Progress,
    StatusData,
    StepData,
    TodoData,
    TodoItem,
    TurnData,
    EventData,
    EventKind,
    JobStatus,
    Phase,
    StepState,
    TodoState,
    clip,
    todo_state,
)
from progress_service.hooks.body import MAPPED_EVENTS, HookInput, body_hash
from worker.mapping import Mapped
from worker.tools import tool_phase, tool_title
from worker.step_detail import step_input, step_output

#: Bounded memories of a session (ids of finished tools, body hashes).
RECENT_MAX = 256
PROMPT_MAX_CHARS = 2000
_any_dec = msgspec.json.Decoder()
_TASK_ID_RE = re.compile(rb'(?:#\s*|"id"\s*:\s*"?)([A-Za-z0-9_-]{1,40})')
#: The prompt the CLI submits itself when a subagent or background task ends.
_NOTIFICATION_TAG = "<task-notification>"
_NOTIFICATION_FIELD_RE = re.compile(r"<(tool-use-id|status|summary)>([^<]{0,500})</\1>")

# --------------------------------------------------------------------------
# What a session remembers between posts
# --------------------------------------------------------------------------


class ToolState(Struct, kw_only=True):
    tool: str
    title: str
    started: int
    parent: str | None = None


class TodoEntry(Struct, kw_only=True):
    id: str
    text: str
    state: TodoState


class SessionState(Struct, kw_only=True):
    #: Prompts the user gave (``turn`` events).
    turn: int = 0
    #: Rounds the CLI started itself, answering a task notification.
    wakes: int = 0
    turn_hash: str | None = None
    turn_open: bool = False
    #: The round (``turn + wakes``) whose Stop was applied.
    stopped_turn: int = -1
    running: bool = False
    closed: bool = False
    pending: dict[str, ToolState] = msgspec.field(default_factory=dict)
    done: list[str] = msgspec.field(default_factory=list)
    seen: list[str] = msgspec.field(default_factory=list)
    agents: dict[str, int] = msgspec.field(default_factory=dict)  # agent step id -> started
    todos: list[TodoEntry] = msgspec.field(default_factory=list)
    #: Hook posts applied (the per-session cap counts these).
    posts: int = 0


def _remember(items: list[str], key: str) -> None:
    items.append(key)
    if len(items) > RECENT_MAX:
        del items[: len(items) - RECENT_MAX]


def _response_text(raw: msgspec.Raw) -> Any:
    """A PostToolUse ``tool_response`` as a tool result's content (Bash: its stdout and stderr)."""
    try:
        value = _any_dec.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return ""
    if isinstance(value, dict) and isinstance(value.get("stdout"), str):
        stderr = value.get("stderr")
        return value["stdout"] + (f"\n{stderr}" if isinstance(stderr, str) and stderr else "")
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    return value


def agent_step_id(agent_id: str) -> str:
    """The step id of a subagent (its tool calls nest under it)."""
    return f"agent-{agent_id}"[:100]


# --------------------------------------------------------------------------
# The mapper
# --------------------------------------------------------------------------


class HookMapper:
    """Applies hooks of one session to its snapshot and state (both replaced, never mutated in place)."""

    def __init__(self, snapshot: JobSnapshot, state: SessionState) -> None:
        self.snapshot = snapshot
        self.state = state

    def _emit(self, out: list[Mapped], at: int, kind: EventKind, data: EventData, **changes: Any) -> None:
        if changes:
            self.snapshot = msgspec.structs.replace(self.snapshot, **changes)
        out.append(Mapped(kind=kind, at=at, data=data, snapshot=msgspec.structs.replace(self.snapshot)))

    def _phase(self, out: list[Mapped], at: int, phase: Phase) -> None:
        if phase != self.snapshot.phase:
            self._emit(out, at, "phase", PhaseData(phase=phase, since=at), phase=phase)

    def _status(self, out: list[Mapped], at: int, status: JobStatus, reason: str | None = None) -> None:
        changes: dict[str, Any] = {"status": status, "reason": reason}
        if status in TERMINAL_STATUSES:
            changes.update(finishedAt=at, step=None)
        else:
            changes.update(finishedAt=None, result=None)
            if self.snapshot.startedAt is None:
                changes["startedAt"] = at
        self.snapshot = msgspec.structs.replace(self.snapshot, **changes)
        self._emit(out, at, "status", StatusData(status=status, phase=self.snapshot.phase, reason=reason))

    def _log(self, out: list[Mapped], at: int, stream: str, line: str) -> None:
        self._emit(out, at, "log", LogData(stream=stream, line=clip(line, LOG_LINE_MAX_CHARS)))

    def _todos(self, out: list[Mapped], at: int) -> None:
        items = [TodoItem(text=t.text, state=t.state) for t in self.state.todos]
        done = sum(1 for t in items if t.state == "completed")
        self._emit(out, at, "todo", TodoData(items=items, done=done, total=len(items)), progress=Progress(done=done, total=len(items)))

    def _ensure_running(self, out: list[Mapped], at: int) -> None:
        if not self.state.running:
            self.state.running = True
            self._status(out, at, "running")
            self._phase(out, at, "starting")

    def note(self, at: int, line: str) -> list[Mapped]:
        """A ``log`` event about the session itself (e.g. a cap reached)."""
        out: list[Mapped] = []
        self._log(out, at, "session", line)
        return out

    # -- entry point ----------------------------------------------------------

    def apply(self, hook: HookInput, raw_hash: str, at: int) -> list[Mapped]:
        """The events one hook leads to (none for a duplicate or a closed session)."""
        out: list[Mapped] = []
        event = hook.hook_event_name
        st = self.state
        if st.closed and event != "SessionStart":
            return out
        key = self._dedupe_key(hook, raw_hash)
        if key is not None:
            if key in st.seen:
                return out
            _remember(st.seen, key)
        st.posts += 1
        if event == "SessionStart":
            st.closed = False
            self._session_info(hook)
            if hook.model and not self.snapshot.model:
                self.snapshot = msgspec.structs.replace(self.snapshot, model=clip(hook.model, 100))
            self._ensure_running(out, at)
            return out
        self._session_info(hook)
        self._ensure_running(out, at)
        handler = getattr(self, "_on_" + event, None)
        if handler is not None and event in MAPPED_EVENTS:
            handler(out, hook, raw_hash, at)
        return out

    def _dedupe_key(self, hook: HookInput, raw_hash: str) -> str | None:
        event = hook.hook_event_name
        if event in ("PreToolUse", "PostToolUse", "PostToolUseFailure") and hook.tool_use_id:
            return f"{event}:{hook.tool_use_id}"
        if event in ("SubagentStart", "SubagentStop") and hook.agent_id:
            return f"{event}:{hook.agent_id}"
        if event in ("TaskCreated", "TaskCompleted") and hook.task_id is not None:
            return f"{event}:{hook.task_id}"
        if event in ("UserPromptSubmit", "Stop", "StopFailure", "SessionEnd"):
            return None  # decided by the turn state (a prompt may legitimately repeat)
        return f"h:{raw_hash}"

    def _session_info(self, hook: HookInput) -> None:
        info = self.snapshot.session
        if info is None:
            return
        changes: dict[str, Any] = {}
        if hook.cwd and not info.cwd:
            changes["cwd"] = clip(hook.cwd, 1000)
        if hook.git_branch and not info.branch:
            changes["branch"] = clip(hook.git_branch, 200)
        if changes:
            self.snapshot = msgspec.structs.replace(self.snapshot, session=msgspec.structs.replace(info, **changes))

    # -- turns ----------------------------------------------------------------

    def _on_UserPromptSubmit(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        st = self.state
        prompt = (hook.prompt or "").strip()
        digest = body_hash(prompt.encode())
        if st.turn_open and st.turn_hash == digest:
            st.posts -= 1
            return  # the same prompt again while its turn runs: a retried delivery
        st.turn_open, st.turn_hash = True, digest
        if prompt.startswith(_NOTIFICATION_TAG):
            self._notification(out, prompt, at)
            return
        st.turn += 1
        changes: dict[str, Any] = {}
        if not self.snapshot.prompt and prompt:
            changes["prompt"] = clip(prompt, PROMPT_MAX_CHARS)
        if self.snapshot.session is not None:
            changes["session"] = msgspec.structs.replace(self.snapshot.session, turns=st.turn)
        if self.snapshot.status in TERMINAL_STATUSES:
            self._status(out, at, "running")  # a new prompt after Stop reopens the session
        self._emit(out, at, "turn", TurnData(turn=st.turn, prompt=clip(prompt, PROMPT_MAX_CHARS)), **changes)

    def _notification(self, out: list[Mapped], prompt: str, at: int) -> None:
        """A subagent or background task reported back; the CLI answers it with a round of its own."""
        self.state.wakes += 1
        fields = dict(_NOTIFICATION_FIELD_RE.findall(prompt))
        summary = fields.get("summary", "").strip() or "a background task finished"
        status = fields.get("status", "").strip()
        text = clip(summary + (f" ({status})" if status and status not in summary else ""), MESSAGE_MAX_CHARS)
        step_id = clip(fields.get("tool-use-id", "").strip(), 100) or None
        if self.snapshot.status in TERMINAL_STATUSES:
            self._status(out, at, "running")  # the CLI is working again until this round's Stop
        self._emit(out, at, "notice", NoticeData(kind="subagent", text=text, stepId=step_id))

    def _end_turn(self, out: list[Mapped], at: int, status: JobStatus, reason: str | None, text: str | None) -> None:
        st = self.state
        round_ = st.turn + st.wakes
        if st.stopped_turn == round_:
            st.posts -= 1
            return  # this round ended already: a retried delivery
        st.stopped_turn, st.turn_open = round_, False
        if text and text.strip():
            self._emit(out, at, "message", MessageData(text=clip(text.strip(), MESSAGE_MAX_CHARS)))
        self._phase(out, at, "finishing")
        self._status(out, at, status, reason)

    def _on_Stop(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._end_turn(out, at, "succeeded", None, hook.last_assistant_message)

    def _on_StopFailure(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        reason = clip(hook.error or "the turn ended with an API error", 500)
        self._end_turn(out, at, "failed", reason, hook.last_assistant_message)

    def _on_SessionEnd(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self.state.closed = True
        if self.snapshot.status not in TERMINAL_STATUSES:
            self._phase(out, at, "finishing")
            self._status(out, at, "succeeded", f"session ended ({clip(hook.reason or 'other', 100)})")

    # -- tools ----------------------------------------------------------------

    def _parent(self, hook: HookInput) -> str | None:
        return agent_step_id(hook.agent_id) if hook.agent_id else None

    def _start_tool(self, out: list[Mapped], hook: HookInput, tool_id: str, at: int) -> ToolState:
        tool = clip(hook.tool_name or "unknown", 100)
        tool_input = hook.tool_input or {}
        self._phase(out, at, tool_phase(tool, tool_input, self.snapshot.phase))
        pending = ToolState(tool=tool, title=tool_title(tool, tool_input), started=at, parent=self._parent(hook))
        self.state.pending[tool_id] = pending
        step = CurrentStep(stepId=tool_id, tool=tool, title=pending.title, state="started", startedAt=at)
        data = StepData(
            stepId=tool_id, tool=tool, title=pending.title, state="started",
            input=step_input(tool, tool_input), parentStepId=pending.parent,
        )
        self._emit(out, at, "step", data, step=step)
        self._tool_todos(out, tool, tool_input, at)
        return pending

    def _on_PreToolUse(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        tool_id = clip(hook.tool_use_id or f"hook-{raw_hash}", 100)
        if tool_id in self.state.done or tool_id in self.state.pending:
            return  # its PostToolUse came first
        self._start_tool(out, hook, tool_id, at)

    def _finish_tool(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int, state: StepState) -> None:
        tool_id = clip(hook.tool_use_id or f"hook-{raw_hash}", 100)
        if tool_id in self.state.done:
            return
        pending = self.state.pending.pop(tool_id, None)
        duration: int | None = at - pending.started if pending else None
        if pending is None:
            # The PostToolUse overtook its PreToolUse: show the start first.
            pending = self._start_tool(out, hook, tool_id, at)
            self.state.pending.pop(tool_id, None)
        _remember(self.state.done, tool_id)
        content = (hook.error or "") if state == "error" else _response_text(hook.tool_response)
        result = step_output(pending.tool, content, state == "error")
        data = StepData(
            stepId=tool_id, tool=pending.tool, title=pending.title, state=state,
            durationMs=duration, output=result.output, outputChars=result.outputChars,
            exitCode=result.exitCode, error=result.error, parentStepId=pending.parent,
        )
        step = CurrentStep(stepId=tool_id, tool=pending.tool, title=pending.title, state=state, startedAt=pending.started)
        self._emit(out, at, "step", data, step=step)
        if pending.tool == "TaskCreate" and state == "ok":
            self._task_created(out, hook, at)

    def _on_PostToolUse(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._finish_tool(out, hook, raw_hash, at, "ok")

    def _on_PostToolUseFailure(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._finish_tool(out, hook, raw_hash, at, "error")

    # -- to-dos -----------------------------------------------------------------

    def _tool_todos(self, out: list[Mapped], tool: str, tool_input: dict[str, Any], at: int) -> None:
        todos = tool_input.get("todos")
        if tool == "TodoWrite" and isinstance(todos, list):
            self.state.todos = [
                TodoEntry(
                    id=str(raw.get("id", n)),
                    text=clip(str(raw.get("content") or raw.get("activeForm") or ""), TITLE_MAX_CHARS),
                    state=todo_state(raw.get("status")),
                )
                for n, raw in enumerate(todos, 1)
                if isinstance(raw, dict)
            ]
            self._todos(out, at)
        elif tool == "TaskUpdate":
            task_id = str(tool_input.get("taskId", tool_input.get("id", "")))
            status, subject = tool_input.get("status"), tool_input.get("subject")
            for entry in list(self.state.todos):
                if entry.id != task_id:
                    continue
                if status == "deleted":
                    self.state.todos.remove(entry)
                else:
                    entry.state = todo_state(status, entry.state)
                    entry.text = clip(subject, TITLE_MAX_CHARS) if isinstance(subject, str) and subject else entry.text
                self._todos(out, at)
                break

    def _set_todo(self, out: list[Mapped], at: int, task_id: str, text: str | None, state: TodoState | None) -> None:
        for entry in self.state.todos:
            if entry.id == task_id:
                if (text and text != entry.text) or (state and state != entry.state):
                    entry.text, entry.state = text or entry.text, state or entry.state
                    self._todos(out, at)
                return
        self.state.todos.append(TodoEntry(id=task_id, text=text or f"task {task_id}", state=state or "pending"))
        self._todos(out, at)

    def _task_created(self, out: list[Mapped], hook: HookInput, at: int) -> None:
        # The task's id is only in the tool's result ("Task #3 created", or {"task": {"id": "3"}}).
        raw = bytes(hook.tool_response)
        match = _TASK_ID_RE.search(raw[:4000])
        subject = (hook.tool_input or {}).get("subject") or (hook.tool_input or {}).get("description")
        if match and isinstance(subject, str):
            task_id = match.group(1).decode()
            if all(e.id != task_id for e in self.state.todos):
                self._set_todo(out, at, task_id, clip(subject, TITLE_MAX_CHARS), None)

    def _on_TaskCreated(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        subject = clip(hook.task_subject, TITLE_MAX_CHARS) if hook.task_subject else None
        self._set_todo(out, at, str(hook.task_id or raw_hash), subject, None)

    def _on_TaskCompleted(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        subject = clip(hook.task_subject, TITLE_MAX_CHARS) if hook.task_subject else None
        self._set_todo(out, at, str(hook.task_id or raw_hash), subject, "completed")

    # -- subagents ----------------------------------------------------------------

    def _on_SubagentStart(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        step_id = agent_step_id(hook.agent_id or raw_hash)
        if step_id in self.state.agents:
            return
        self.state.agents[step_id] = at
        # It runs inside the Agent/Task tool call that started it, when one is open.
        parent = next((tid for tid, p in reversed(self.state.pending.items()) if p.tool in ("Agent", "Task")), None)
        title = clip(hook.agent_type or "subagent", TITLE_MAX_CHARS)
        self.state.pending[step_id] = ToolState(tool="Subagent", title=title, started=at, parent=parent)
        step = CurrentStep(stepId=step_id, tool="Subagent", title=title, state="started", startedAt=at)
        self._emit(out, at, "step", StepData(stepId=step_id, tool="Subagent", title=title, state="started", parentStepId=parent), step=step)

    def _on_SubagentStop(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        step_id = agent_step_id(hook.agent_id or raw_hash)
        pending = self.state.pending.pop(step_id, None)
        if pending is None:
            self._on_SubagentStart(out, hook, raw_hash, at)
            pending = self.state.pending.pop(step_id)
            duration = None
        else:
            duration = at - pending.started
        _remember(self.state.done, step_id)
        data = StepData(stepId=step_id, tool="Subagent", title=pending.title, state="ok", durationMs=duration, parentStepId=pending.parent)
        step = CurrentStep(stepId=step_id, tool="Subagent", title=pending.title, state="ok", startedAt=pending.started)
        self._emit(out, at, "step", data, step=step)

    # -- what the session tells its user ---------------------------------------------

    def _on_Notification(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        text = ": ".join(t for t in (hook.title, hook.message) if t)
        if text:
            self._log(out, at, "notification", text)

    def _on_PermissionRequest(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._log(out, at, "permission", f"asks permission to use {hook.tool_name or 'a tool'}")

    def _on_PermissionDenied(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._log(out, at, "permission", f"permission denied for {hook.tool_name or 'a tool'}")

    def _on_PreCompact(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._log(out, at, "session", f"compacting the conversation ({hook.trigger or 'auto'})")

    def _on_PostCompact(self, out: list[Mapped], hook: HookInput, raw_hash: str, at: int) -> None:
        self._log(out, at, "session", "conversation compacted")
