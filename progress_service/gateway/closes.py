"""Every close code and reason the gateway sends, in one table.

Handlers never write a close code literal: they pick a :class:`Close` from
here, so docs/protocol.md's table and the code cannot drift apart. Reasons
are kept under the 123-byte limit of a WebSocket close frame.
"""

from __future__ import annotations

from typing import NamedTuple

#: A close frame's reason may carry at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


class Close(NamedTuple):
    code: int
    reason: str


BYE = Close(1000, "bye")
RESTARTING = Close(1001, "server restarting")
TEXT_ONLY = Close(1003, "text frames only")
INVALID_JSON = Close(1008, "invalid JSON")
INVALID_MESSAGE = Close(1008, "invalid message")
CHAT_BEFORE_JOIN = Close(1008, "join room before chat")
TOO_MANY_ERRORS = Close(1008, "too many errors")
TOO_LARGE = Close(1009, "message too large")
INTERNAL = Close(1011, "internal error")
SLOW_CONSUMER = Close(1013, "slow consumer")
AUTH_REQUIRED = Close(4401, "auth required")
TOKEN_EXPIRED = Close(4401, "token expired")
AUTH_FAILED = Close(4403, "auth failed")
#: The token of a live connection was revoked: stop and sign in again
#: (a distinct reason so clients can say so, not "auth failed").
REVOKED = Close(4403, "token revoked")
RATE_LIMITED = Close(4429, "rate limited")
TOO_MANY_CONNECTIONS = Close(4429, "too many connections")

#: Closes caused by a misbehaving client; each one goes to the audit log.
ABUSE_CODES: frozenset[int] = frozenset({1008, 1009, 4429})

ALL: tuple[Close, ...] = (
    BYE,
    RESTARTING,
    TEXT_ONLY,
    INVALID_JSON,
    INVALID_MESSAGE,
    CHAT_BEFORE_JOIN,
    TOO_MANY_ERRORS,
    TOO_LARGE,
    INTERNAL,
    SLOW_CONSUMER,
    AUTH_REQUIRED,
    TOKEN_EXPIRED,
    AUTH_FAILED,
    REVOKED,
    RATE_LIMITED,
    TOO_MANY_CONNECTIONS,
)


def policy(reason: str) -> Close:
    """A 1008 close whose reason names the problem (e.g. msgspec's error text).

    The reason is clipped on a character boundary to fit the close frame.
    """
    return Close(1008, clip_reason(reason))


def clip_reason(reason: str) -> str:
    """``reason`` shortened to at most 123 bytes of UTF-8."""
    raw = reason.encode()
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
