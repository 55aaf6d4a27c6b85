"""Every WebSocket close code, its reasons and its policy, in one table.

As centrifuge's ``disconnect.go``: a close is a value that carries what the
client should do about it. The gateway never writes a code literal (it picks
a :class:`Close` from here), the terminal client decides with
:func:`policy_of`, and the browser's tables in ``web/js/socket.js`` are
checked against :data:`POLICIES` by ``tests/test_close_codes.py``;
docs/protocol.md's table is checked by ``tests/test_docs.py``.

Policy belongs to the code, the reason says which rule tripped. That is why
1008 carries several reasons (invalid JSON, invalid message, a schema error
naming the field, chat before join, too many errors): every one of them is a
client bug with the same remedy (fix the client, retry only after a long
backoff) and RFC 6455 reserves 1008 for exactly that. A new reason that
needs another remedy gets a code of its own.

This module imports nothing of the service: the terminal client uses it
without loading the server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

#: A close frame's reason may carry at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


class Reconnect(enum.Enum):
    """What a client does after a close."""

    #: Retrying cannot help: the user (or the client's author) must act.
    STOP = "stop"
    #: Reconnect with the normal backoff, rejoin with ``since``.
    BACKOFF = "backoff"
    #: Reconnect only after a long backoff (abuse, or a client bug).
    LONG_BACKOFF = "long_backoff"


@dataclass(frozen=True, slots=True)
class CodePolicy:
    """The contract of one close code."""

    code: int
    reconnect: Reconnect
    #: A misbehaving client: the close is written to the audit log.
    audited: bool
    #: Messages already queued are sent before the close (they explain it);
    #: restarts, internal errors and slow consumers close at once.
    flush: bool
    #: Who sends it: the gateway, or the WebSocket library before a frame reaches it.
    by_library: bool = False


_STOP, _BACKOFF, _LONG = Reconnect.STOP, Reconnect.BACKOFF, Reconnect.LONG_BACKOFF

#: Every close code a client can receive from the service.
POLICIES: dict[int, CodePolicy] = {
    p.code: p
    for p in (
        CodePolicy(1000, _STOP, audited=False, flush=True),
        CodePolicy(1001, _BACKOFF, audited=False, flush=False),
        CodePolicy(1002, _STOP, audited=False, flush=False, by_library=True),
        CodePolicy(1003, _STOP, audited=False, flush=True),
        CodePolicy(1007, _STOP, audited=False, flush=False, by_library=True),
        CodePolicy(1008, _LONG, audited=True, flush=True),
        CodePolicy(1009, _STOP, audited=True, flush=True),
        CodePolicy(1011, _BACKOFF, audited=False, flush=False),
        CodePolicy(1013, _BACKOFF, audited=False, flush=False),
        CodePolicy(4401, _BACKOFF, audited=False, flush=True),
        CodePolicy(4403, _STOP, audited=False, flush=True),
        CodePolicy(4429, _LONG, audited=True, flush=True),
    )
}

#: Codes no table lists (1006 abnormal closure, a proxy's own): reconnect normally.
_UNKNOWN = CodePolicy(0, _BACKOFF, audited=False, flush=True)


def policy_of(code: int) -> CodePolicy:
    """The policy of ``code``; an unlisted code is retried with the normal backoff."""
    return POLICIES.get(code, _UNKNOWN)


class Close(NamedTuple):
    """A close frame the gateway sends: the code's policy travels with it."""

    code: int
    reason: str

    @property
    def policy(self) -> CodePolicy:
        """The contract of this close's code."""
        return policy_of(self.code)

    @property
    def audited(self) -> bool:
        """Whether the close goes to the audit log (a misbehaving client)."""
        return self.policy.audited

    @property
    def flush(self) -> bool:
        """Whether queued messages are sent before the close frame."""
        return self.policy.flush


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

#: Every fixed close the gateway sends (:func:`policy` adds 1008s naming a field).
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


def handshake_refused(reason: str) -> Close:
    """The close that refuses a WebSocket handshake (sent before accept: an HTTP 403)."""
    return policy(reason)


def clip_reason(reason: str) -> str:
    """``reason`` shortened to at most 123 bytes of UTF-8."""
    raw = reason.encode()
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
