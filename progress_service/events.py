"""Job event and wire message types, defined once.

The worker builds :class:`JobEvent` payloads and appends them to a job's
Redis stream; the gateway and the HTTP API read them back and wrap them in
the server messages of ``docs/protocol.md``. Client messages form one tagged
union decoded by a single module-level decoder (see ``gateway``).

Why one module of ~560 lines: it is the wire contract. Each type is a few
declarative lines, and the protocol's shapes read side by side are the point;
split per message, one schema would be scattered over a dozen files.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta, Struct

from progress_service.ids import EVENT_ID_MAX_LENGTH, EVENT_ID_PATTERN, ROOM_ID_PATTERN

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

Phase = Literal["queued", "starting", "planning", "editing", "testing", "reviewing", "finishing"]
PHASES: tuple[str, ...] = ("queued", "starting", "planning", "editing", "testing", "reviewing", "finishing")

EventKind = Literal[
    "status", "phase", "step", "message", "todo", "usage", "log", "result", "worker", "turn", "retry", "notice",
    "instruction", "permission",
]

Role = Literal["viewer", "reviewer", "submitter", "admin", "reporter"]
#: The ladder of roles that read: each may do what those below it may.
ROLE_RANK: dict[str, int] = {"viewer": 0, "reviewer": 1, "submitter": 2, "admin": 3}
#: Outside the ladder: may only report Claude Code sessions of its own team
#: (``POST /api/hooks/claude-code``) and read nothing.
REPORTER_ROLE = "reporter"
ROLES: tuple[str, ...] = (*ROLE_RANK, REPORTER_ROLE)

#: What a job is: submitted here and run by a worker (``job``), or a Claude
#: Code session running elsewhere that reports through hooks (``session``).
JobKind = Literal["job", "session"]

#: Bounds on what one event may carry, so a chatty agent cannot flood rooms.
MESSAGE_MAX_CHARS = 2000
LOG_LINE_MAX_CHARS = 2000
TITLE_MAX_CHARS = 200
SUMMARY_MAX_CHARS = 4000
#: Step detail bounds: each input field (command, diff, ...) and a tool's
#: output are cut here in the event log; ``outputChars`` tells the full size.
STEP_INPUT_MAX_CHARS = 8000
STEP_OUTPUT_MAX_CHARS = 16000


def clip(text: str, limit: int) -> str:
    """Shorten ``text`` to ``limit`` characters, marking the cut with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------
# Job event payloads (``event.data`` per ``event.kind``)
# --------------------------------------------------------------------------


class StatusData(Struct, kw_only=True, omit_defaults=True):
    status: JobStatus
    phase: Phase
    reason: str | None = None
    #: On ``running``: whether this attempt runs the replay program (decided by its worker).
    demo: bool | None = None


class PhaseData(Struct, kw_only=True):
    phase: Phase
    since: int  # epoch ms


class StepInput(Struct, kw_only=True, omit_defaults=True):
    """What a tool call was asked to do, each field clipped to ``STEP_INPUT_MAX_CHARS``."""

    command: str | None = None
    path: str | None = None
    #: Unified diff for Edit/MultiEdit/Write (a new file is all ``+`` lines).
    diff: str | None = None
    pattern: str | None = None
    #: Anything else worth showing (URL, query, subagent prompt, JSON input).
    text: str | None = None


class StepData(Struct, kw_only=True, omit_defaults=True):
    """A tool call: ``started`` carries its input, ``ok``/``error`` its output."""

    stepId: str
    tool: str
    title: str
    state: StepState
    durationMs: int | None = None
    input: StepInput | None = None
    #: The tool result's text, clipped to ``STEP_OUTPUT_MAX_CHARS``.
    output: str | None = None
    #: Length of the full output when ``output`` was clipped.
    outputChars: int | None = None
    #: A shell command's exit status, where the result tells it.
    exitCode: int | None = None
    #: First line of an error result, for a one-line annotation.
    error: str | None = None
    #: The subagent (Agent/Task) step this step ran under (the CLI's ``parent_tool_use_id``).
    parentStepId: str | None = None
    #: While ``started``: how long the tool has been running (the CLI's ``tool_progress``).
    elapsedMs: int | None = None


class MessageData(Struct, kw_only=True):
    text: str


TodoState = Literal["pending", "in_progress", "completed"]
StepState = Literal["started", "ok", "error"]
TODO_STATES: tuple[TodoState, ...] = get_args(TodoState)


def todo_state(value: object, default: TodoState = "pending") -> TodoState:
    """``value`` if it is a to-do state (a tool's input is untyped JSON), else ``default``."""
    return next((s for s in TODO_STATES if s == value), default)


class TodoItem(Struct, kw_only=True):
    text: str
    state: TodoState


class TodoData(Struct, kw_only=True):
    items: list[TodoItem]
    done: int
    total: int


class UsageData(Struct, kw_only=True, omit_defaults=True):
    inputTokens: int
    outputTokens: int
    costUsd: float | None = None


class LogData(Struct, kw_only=True):
    stream: str
    line: str


class ResultData(Struct, kw_only=True, omit_defaults=True):
    ok: bool
    turns: int
    durationMs: int
    costUsd: float
    summary: str
    error: str | None = None


WorkerState = Literal["alive", "lost"]


class WorkerData(Struct, kw_only=True):
    state: WorkerState
    workerId: str


class TurnData(Struct, kw_only=True):
    """A prompt the user gave a session (``turn`` 1, 2, ...), bounded."""

    turn: int
    prompt: str


class RetryData(Struct, kw_only=True, omit_defaults=True):
    """The CLI is retrying a failed API request (its ``system/api_retry`` line)."""

    attempt: int
    maxRetries: int
    delayMs: int
    #: HTTP status of the failure, when there was one (none: no network).
    errorStatus: int | None = None
    error: str = ""
    #: What to show: "retrying the API (3/10, 529 overloaded, next in 8 s)".
    text: str


NoticeKind = Literal["permission_denied", "compact", "hook", "subagent", "rate_limit", "status", "other"]


class NoticeData(Struct, kw_only=True, omit_defaults=True):
    """Something the CLI reported that is neither a step nor a message."""

    kind: NoticeKind
    text: str
    #: The step it concerns (a denied tool call, a subagent's Agent step).
    stepId: str | None = None


#: An instruction's way: stored and read by the worker (queued), echoed by the
#: CLI (delivered), or refused on the way (rejected, with a reason).
InstructionState = Literal["queued", "delivered", "rejected"]
INSTRUCTION_MAX_CHARS = 8000


class InstructionData(Struct, kw_only=True, omit_defaults=True):
    """A reviewer's or submitter's instruction to the running CLI (``steer``)."""

    requestId: str
    by: str
    text: str
    state: InstructionState
    reason: str | None = None


#: A permission prompt of the CLI: waiting for an answer, then its outcome.
PermissionState = Literal["pending", "allowed", "denied", "expired"]


class PermissionData(Struct, kw_only=True, omit_defaults=True):
    """The CLI asks whether a tool may run (``permissionMode: "ask"``)."""

    permissionId: str
    tool: str
    state: PermissionState
    input: dict[str, Any] | None = None
    #: The step (tool use id) it concerns, when the CLI names it.
    stepId: str | None = None
    #: Who answered (allowed / denied), and their message to the agent.
    by: str | None = None
    message: str | None = None
    #: With ``pending``: when an unanswered prompt is denied (epoch ms).
    expiresAt: int | None = None


EventData = (
    StatusData | PhaseData | StepData | MessageData | TodoData | UsageData | LogData | ResultData | WorkerData
    | TurnData | RetryData | NoticeData | InstructionData | PermissionData
)

DATA_TYPES: dict[str, type[Struct]] = {
    "status": StatusData,
    "phase": PhaseData,
    "step": StepData,
    "message": MessageData,
    "todo": TodoData,
    "usage": UsageData,
    "log": LogData,
    "result": ResultData,
    "worker": WorkerData,
    "turn": TurnData,
    "retry": RetryData,
    "notice": NoticeData,
    "instruction": InstructionData,
    "permission": PermissionData,
}


class StoredEvent(Struct, kw_only=True, omit_defaults=True):
    """The body of one job-stream entry (field ``b``), without id and room.

    ``attempt`` tells which run of the job produced it: a job whose worker
    died is started again, and its events are then seen twice.
    """

    kind: str
    at: int
    data: dict[str, Any]
    attempt: int = 1


class StoredChat(Struct, kw_only=True, omit_defaults=True):
    """The body of a comment entry in a job stream (field ``b``)."""

    requestId: str
    userId: str
    userName: str
    text: str
    sentAt: int
    #: Only on a comment replayed from the store whose row no longer matches
    #: its audit record (``text`` is then the record's); never in Redis.
    tampered: bool = False


# --------------------------------------------------------------------------
# Snapshot: the job's state as of its latest event
# --------------------------------------------------------------------------


class Progress(Struct, kw_only=True):
    done: int = 0
    total: int = 0


class CurrentStep(Struct, kw_only=True, omit_defaults=True):
    stepId: str
    tool: str
    title: str
    state: str
    startedAt: int | None = None
    parentStepId: str | None = None


class Usage(Struct, kw_only=True):
    inputTokens: int = 0
    outputTokens: int = 0


class SessionInfo(Struct, kw_only=True):
    """Where a ``session`` job runs: it was started elsewhere, not by this service."""

    #: How it reports: ``hook`` (Claude Code HTTP hooks).
    source: str = "hook"
    #: Claude Code's own session id.
    sessionId: str
    #: The reporter's label of the machine (``X-PS-Host``), when sent.
    host: str | None = None
    cwd: str | None = None
    branch: str | None = None
    #: Prompts seen so far.
    turns: int = 0


class JobSnapshot(Struct, kw_only=True):
    """What ``joined.snapshot`` and ``GET /api/jobs/{id}`` show."""

    id: str
    roomId: str
    status: JobStatus = "queued"
    phase: Phase = "queued"
    progress: Progress = msgspec.field(default_factory=Progress)
    step: CurrentStep | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    costUsd: float | None = None
    result: ResultData | None = None
    reason: str | None = None
    #: Set while the CLI waits to retry a failed API request; cleared when the model answers.
    retry: RetryData | None = None
    attempt: int = 1
    demo: bool = False
    prompt: str = ""
    model: str | None = None
    workdir: str = ""
    createdAt: int = 0
    startedAt: int | None = None
    finishedAt: int | None = None
    submittedBy: str | None = None
    lastEventId: str | None = None
    kind: JobKind = "job"
    #: Set for ``session`` jobs only.
    session: SessionInfo | None = None


# --------------------------------------------------------------------------
# Client -> server messages (protocol v1). One tagged union, strict.
# --------------------------------------------------------------------------

RoomId = Annotated[str, Meta(pattern=ROOM_ID_PATTERN)]
# The one event-id shape (see progress_service.ids).
EventId = Annotated[str, Meta(pattern=EVENT_ID_PATTERN, max_length=EVENT_ID_MAX_LENGTH)]
# No control characters: a NUL is refused by PostgreSQL, and one bad row
# would fail the whole group commit of other users' comments with it.
RequestId = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]
Secret = Annotated[str, Meta(min_length=1, max_length=512)]
ClientName = Annotated[str, Meta(max_length=100)]


class ClientAuth(Struct, tag="auth", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    token: Secret
    batch: bool = False
    client: ClientName | None = None


class ClientJoin(Struct, tag="join", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    roomId: RoomId
    since: EventId | None = None


class ClientLeave(Struct, tag="leave", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    roomId: RoomId


class ClientChat(Struct, tag="chat", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    roomId: RoomId
    requestId: RequestId
    # The character limit after trimming is a setting; this bound only keeps
    # the decoder from building huge strings.
    text: Annotated[str, Meta(max_length=8192)]


class ClientSteer(Struct, tag="steer", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """An instruction for the running CLI (``docs/protocol.md``, "Steering")."""

    roomId: RoomId
    requestId: RequestId
    text: Annotated[str, Meta(max_length=INSTRUCTION_MAX_CHARS)]


class ClientDecide(Struct, tag="decide", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """An answer to a pending ``permission`` event."""

    roomId: RoomId
    requestId: RequestId
    permissionId: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]
    allow: bool
    message: Annotated[str, Meta(max_length=2000)] | None = None


class ClientPing(Struct, tag="ping", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    pass


ClientMessage = ClientAuth | ClientJoin | ClientLeave | ClientChat | ClientSteer | ClientDecide | ClientPing

# --------------------------------------------------------------------------
# Server -> client messages
# --------------------------------------------------------------------------


class AuthOk(Struct, tag="auth_ok", tag_field="type", kw_only=True):
    connectionId: str
    userId: str
    heartbeatMs: int
    expiresAt: int


class PresenceMember(Struct, kw_only=True):
    userId: str
    userName: str


class Joined(Struct, tag="joined", tag_field="type", kw_only=True):
    roomId: str
    role: str
    snapshot: JobSnapshot
    head: str | None
    #: At most 100 users, the joining one first (docs/protocol.md, Presence).
    presence: list[PresenceMember]
    #: How many users are in the room in all (``presence`` may name fewer).
    presenceCount: int = 0


class Gap(Struct, tag="gap", tag_field="type", kw_only=True):
    roomId: str
    since: str
    oldest: str | None


class EventMsg(Struct, tag="event", tag_field="type", kw_only=True, omit_defaults=True):
    roomId: str
    id: str
    kind: str
    at: int
    data: dict[str, Any]
    attempt: int = 1


class ChatMsg(Struct, tag="chat", tag_field="type", kw_only=True):
    roomId: str
    id: str
    requestId: str
    userId: str
    userName: str
    text: str
    sentAt: int


class Ack(Struct, tag="ack", tag_field="type", kw_only=True):
    requestId: str
    id: str


SteerState = Literal["queued", "delivered", "allowed", "denied"]
STEER_STATES: tuple[SteerState, ...] = get_args(SteerState)


class SteerResult(Struct, kw_only=True, omit_defaults=True):
    """The answer to an instruction or a permission answer (HTTP body; the WebSocket acks with ``eventId``).

    ``delivered`` (the CLI echoed the instruction), ``allowed`` / ``denied``
    (the answer reached the CLI), or ``queued`` when the wait for the worker
    ran out (retry with the same request id to learn the outcome).
    """

    requestId: str
    state: SteerState
    eventId: str | None = None


class PresenceMsg(Struct, tag="presence", tag_field="type", kw_only=True):
    roomId: str
    joined: list[PresenceMember]
    left: list[PresenceMember]


class LeftMsg(Struct, tag="left", tag_field="type", kw_only=True):
    roomId: str


class Heartbeat(Struct, tag="heartbeat", tag_field="type", kw_only=True):
    at: int


class Pong(Struct, tag="pong", tag_field="type", kw_only=True):
    sentAt: int


ErrorCode = Literal[
    "not_found", "forbidden", "limit", "rate_limited", "unavailable", "invalid", "not_joined",
    # Steering (docs/protocol.md): the job does not run, its worker is gone,
    # the instruction or answer was refused on its way, or came too late.
    "not_running", "worker_gone", "rejected", "already_decided", "timeout",
]


class ErrorMsg(Struct, tag="error", tag_field="type", kw_only=True, omit_defaults=True):
    code: str
    message: str
    roomId: str | None = None
    requestId: str | None = None


ServerMessage = (
    AuthOk | Joined | Gap | EventMsg | ChatMsg | Ack | PresenceMsg | LeftMsg | Heartbeat | Pong | ErrorMsg
)

#: Decoder for anything a server sends (clients, tests, benchmarks).
server_message_decoder = msgspec.json.Decoder(ServerMessage)


# --------------------------------------------------------------------------
# Job submission (HTTP API body, read by the worker)
# --------------------------------------------------------------------------

#: The ``--permission-mode`` choices of the pinned CLI (``claude --help``); ``default``
#: is still accepted by it as the old name of ``manual``.
PermissionMode = Literal["default", "manual", "acceptEdits", "auto", "plan", "bypassPermissions", "dontAsk", "ask"]
#: ``ask`` is ours, not the CLI's: its ``manual`` mode, with every permission
#: prompt handed to the room (``permission`` events, ``decide`` answers).
ASK_MODE = "ask"
#: Who may steer a job: its submitter only (default), or reviewers too.
Steerable = Literal["submitter", "reviewers"]
PERMISSION_MODES: tuple[str, ...] = get_args(PermissionMode)

#: The built-in tools of the pinned CLI (offered at once or deferred behind
#: ToolSearch), the names ``allowedTools`` may use; ``mcp__...`` names are MCP
#: tools. Glob, Grep, LS and MultiEdit are gone from the CLI, so are refused.
CLAUDE_TOOLS: frozenset[str] = frozenset({
    "Agent", "Task", "Bash", "Edit", "Read", "Write", "NotebookEdit", "WebFetch", "WebSearch",
    "ToolSearch", "Skill", "Workflow", "Monitor", "ListAgents", "ReportFindings", "ScheduleWakeup",
    "SendMessage", "TaskCreate", "TaskGet", "TaskList", "TaskUpdate", "TaskStop", "TodoWrite",
    "CronCreate", "CronDelete", "CronList", "EnterWorktree", "ExitWorktree", "AskUserQuestion", "ExitPlanMode",
})
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_*:().,/ -]{1,100}$")]


def unknown_tools(rules: list[str] | None) -> list[str]:
    """The ``allowedTools`` rules (``Bash``, ``Bash(git *)``, ``mcp__x__y``) that name no CLI tool.

    Checked at submission only: a stored job keeps decoding whatever a
    later CLI version's list says.
    """
    names = ((rule, rule.split("(", 1)[0].strip()) for rule in rules or ())
    return [rule for rule, name in names if not (name in CLAUDE_TOOLS or name.startswith("mcp__"))]


class JobSpec(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a client submits with ``POST /api/jobs``."""

    prompt: Annotated[str, Meta(min_length=1, max_length=100_000)]
    #: Relative to the workspace root; must stay inside it.
    workdir: Annotated[str, Meta(max_length=1024)] | None = None
    model: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:\[\]-]{1,100}$")] | None = None
    maxTurns: Annotated[int, Meta(ge=1, le=1000)] | None = None
    permissionMode: PermissionMode | None = None
    allowedTools: Annotated[list[ToolName], Meta(max_length=100)] | None = None
    timeoutSeconds: Annotated[int, Meta(ge=1)] | None = None
    #: Who may send instructions and answer permission prompts besides the
    #: submitter (and admins): ``reviewers`` lets reviewers do it too.
    steerable: Steerable | None = None
