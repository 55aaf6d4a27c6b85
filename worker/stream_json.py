"""The Claude Code CLI's ``--output-format stream-json`` lines, decoded tolerantly.

The Structs name only the fields the mapper reads; unknown ``type``s,
subtypes and fields are ignored (newer CLI versions add them all the time).
Shapes were taken from the pinned CLI (2.1.332) talking to the scripted model
server (``tests/model_server.py``); the older shapes the replay transcripts
used still decode.

Line types: ``system`` (subtypes ``init``, ``status``, ``api_retry``,
``compact_boundary``, ``hook_started``/``hook_progress``/``hook_response``,
``task_started``/``task_progress``/``task_updated``/``task_notification``,
``permission_denied``, ``background_tasks_changed``...), ``assistant``,
``user``, ``stream_event`` (with ``--include-partial-messages``: the raw
Messages API events), ``tool_progress``, ``rate_limit_event`` and
``result`` (one per finished turn of the session; a session that woke up for
a background task prints more than one).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct


class TokenUsage(Struct, kw_only=True):
    """API usage (messages, results); task_* lines' usage has the last three fields."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0
    total_tokens: int | None = None
    tool_uses: int | None = None
    duration_ms: int | None = None

    @property
    def total_input(self) -> int:
        # Cached prompt tokens are input the model read; they are billed too.
        return self.input_tokens + (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)


class ModelUsage(Struct, kw_only=True):
    """``result.modelUsage[model]``: the session's running totals, subagents included."""

    inputTokens: int = 0
    outputTokens: int = 0
    cacheReadInputTokens: int = 0
    cacheCreationInputTokens: int = 0

    @property
    def total_input(self) -> int:
        return self.inputTokens + self.cacheReadInputTokens + self.cacheCreationInputTokens


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
    model: str | None = None
    content: list[Block] | str | None = None
    usage: TokenUsage | None = None
    stop_reason: str | None = None


class Delta(Struct, kw_only=True):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    stop_reason: str | None = None


class ApiEvent(Struct, kw_only=True):
    """``stream_event.event``: one Messages API server-sent event."""

    type: str = ""
    message: Message | None = None
    delta: Delta | None = None
    usage: TokenUsage | None = None
    index: int | None = None


class CompactMetadata(Struct, kw_only=True):
    trigger: str | None = None
    pre_tokens: int | None = None


class RateLimitInfo(Struct, kw_only=True):
    status: str | None = None
    resetsAt: int | None = None
    rateLimitType: str | None = None
    utilization: float | None = None


class StreamLine(Struct, kw_only=True):
    """Any stream-json line; ``type`` and ``subtype`` pick which fields matter."""

    type: str = ""
    subtype: str | None = None
    session_id: str | None = None
    model: str | None = None
    message: Message | str | None = None
    parent_tool_use_id: str | None = None
    # stream_event
    event: ApiEvent | None = None
    # system/status
    status: str | None = None
    # system/api_retry
    attempt: int | None = None
    max_retries: int | None = None
    retry_delay_ms: int | None = None
    error_status: int | None = None
    error: str | None = None
    # system/permission_denied, tool_progress
    tool_name: str | None = None
    tool_use_id: str | None = None
    elapsed_time_seconds: float | None = None
    # system/task_*
    task_id: str | None = None
    description: str | None = None
    summary: str | None = None
    is_backgrounded: bool | None = None
    task_type: str | None = None
    last_tool_name: str | None = None
    # system/hook_*
    hook_name: str | None = None
    hook_event: str | None = None
    outcome: str | None = None
    exit_code: int | None = None
    stderr: str | None = None
    # system/compact_boundary
    compact_metadata: CompactMetadata | None = None
    # rate_limit_event
    rate_limit_info: RateLimitInfo | None = None
    # result
    is_error: bool | None = None
    duration_ms: int | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    usage: TokenUsage | None = None
    modelUsage: dict[str, ModelUsage] | None = None
    result: str | None = None
    errors: list[str] | None = None
    api_error_status: int | None = None
    terminal_reason: str | None = None


line_decoder = msgspec.json.Decoder(StreamLine)
any_decoder = msgspec.json.Decoder()

_BAD_FIELD_RE = re.compile(r"at `\$\.([A-Za-z0-9_]+)")


def decode_lenient(raw: bytes | str) -> tuple[StreamLine, list[str]]:
    """Decode one line; a top-level field of an unexpected shape is dropped, not the line.

    Returns the line and the names of the dropped fields. Raises
    ``msgspec.DecodeError`` for text that is not JSON and
    ``msgspec.ValidationError`` for JSON that is not an object.
    """
    try:
        return line_decoder.decode(raw), []
    except msgspec.ValidationError as exc:
        error = exc
    value = any_decoder.decode(raw)
    if not isinstance(value, dict):
        raise error
    dropped: list[str] = []
    for _ in range(8):  # a line with more broken fields than this is not worth saving
        found = _BAD_FIELD_RE.search(str(error))
        if found is None or found.group(1) not in value:
            break
        dropped.append(found.group(1))
        del value[found.group(1)]
        try:
            return msgspec.convert(value, StreamLine), dropped
        except msgspec.ValidationError as exc:
            error = exc
    raise error


def retry_text(attempt: int, max_retries: int, delay_ms: int, status: int | None, error: str) -> str:
    """"retrying the API (3/10, 529 overloaded, next in 8 s)"."""
    cause = " ".join(str(p) for p in (status, error.replace("_", " ")) if p) or "no answer"
    delay = delay_ms / 1000
    next_in = f"{delay:.0f} s" if delay >= 10 else f"{delay:.1f} s".replace(".0 s", " s")
    return f"retrying the API ({attempt}/{max_retries}, {cause}, next in {next_in})"
