"""The body of a Claude Code hook POST: the fields this service reads.

Decoding is tolerant where the CLI may grow (unknown fields are ignored;
``tool_response`` is kept raw, never decoded on the request path) and strict
where a wrong type would be a client bug (a 400 names the field).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec
from msgspec import Struct

SessionIdStr = msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")


class HookInput(Struct, kw_only=True):
    """One hook POST body (``hook_event_name`` picks which fields matter)."""

    session_id: Annotated[str, SessionIdStr]
    hook_event_name: str
    cwd: str | None = None
    transcript_path: str | None = None
    permission_mode: str | None = None
    agent_id: str | None = None
    agent_type: str | None = None
    prompt: str | None = None
    tool_name: str | None = None
    tool_input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    #: Never decoded: only a TaskCreate's id is looked for in it.
    tool_response: msgspec.Raw = msgspec.Raw(b"null")
    error: str | None = None
    is_interrupt: bool | None = None
    source: str | None = None
    model: str | None = None
    reason: str | None = None
    last_assistant_message: str | None = None
    task_id: str | int | None = None
    task_subject: str | None = None
    message: str | None = None
    title: str | None = None
    trigger: str | None = None
    git_branch: str | None = None


#: Events that change the room; KNOWN_EVENTS are accepted at all.
MAPPED_EVENTS = frozenset(
    {
        "SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "PostToolUseFailure",
        "SubagentStart", "SubagentStop", "TaskCreated", "TaskCompleted", "Stop", "StopFailure",
        "SessionEnd", "Notification", "PermissionRequest", "PermissionDenied", "PreCompact", "PostCompact",
    }
)
KNOWN_EVENTS = MAPPED_EVENTS | {
    "Setup", "TeammateIdle", "Elicitation", "ElicitationResult", "ConfigChange",
    "WorktreeCreate", "WorktreeRemove", "InstructionsLoaded",
}


def body_hash(raw: bytes) -> str:
    """The dedupe key of a body without a natural id."""
    return hashlib.blake2b(raw, digest_size=12).hexdigest()
