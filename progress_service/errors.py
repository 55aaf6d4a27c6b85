"""The service's exceptions, in one tree.

Each class says what went wrong, not where; the layer that catches it picks
the wire form (HTTP status, WebSocket ``error`` code, CLI exit), and those
forms are listed here so they stay one decision::

    ProgressServiceError
    ├── InvalidInput (also ValueError)     HTTP 400 · WS error "invalid"
    │   ├── InvalidComment                  chat / comment text breaks a rule
    │   ├── InvalidJob                      job spec breaks a rule (prompt, tools, timeout, workdir)
    │   └── WorkdirError                    job workdir outside the workspace
    ├── Forbidden                           HTTP 403 · WS error "forbidden"
    │   └── CommentForbidden                role below reviewer, or not the team's job
    ├── Unavailable                         HTTP 503 · WS error "unavailable"
    │   ├── CommentsUnavailable             comment not stored durably; nothing broadcast
    │   └── Abandoned                       caller stopped waiting; transaction rolled back
    ├── SteerRefusal                        instruction / permission answer refused;
    │                                       ``code`` is the WS error code (HTTP: see api/steering.py)
    ├── NotCancellable                      HTTP 409: a hook-reported session runs elsewhere
    ├── SendTimeout                         a frame did not reach the socket in time (slow-consumer close)
    ├── KeyFileError                        audit key file missing or malformed (CLI exit 1)
    └── ClientError                         the terminal client (``str(exc)`` is for the user)
        ├── ApiError                        an HTTP request failed (``status`` if one came back)
        └── FollowError                     following a job cannot go on

Private control-flow exceptions (the terminal's ``_Retry``, the replay
worker's ``_Terminated``) stay in their modules.
"""

from __future__ import annotations

from typing import Literal

#: The WebSocket error codes of a refused instruction or answer (docs/protocol.md).
SteerCode = Literal[
    "forbidden", "not_found", "invalid", "not_running", "worker_gone", "rejected", "already_decided", "unavailable",
]


class ProgressServiceError(Exception):
    """Base of every exception this package raises on purpose."""


class InvalidInput(ProgressServiceError, ValueError):
    """The input breaks a rule; the message names the rule."""


class InvalidComment(InvalidInput):
    """The text breaks the rules (empty, too long, control characters)."""


class InvalidJob(InvalidInput):
    """The job spec breaks a rule (the message names the field)."""


class NotCancellable(ProgressServiceError):
    """The job cannot be cancelled from here (a Claude Code session reported through hooks)."""


class WorkdirError(InvalidInput):
    """A workdir that is absolute, escapes the root, or does not exist."""


class Forbidden(ProgressServiceError):
    """The principal's role or team does not allow this."""


class CommentForbidden(Forbidden):
    """The user may not comment in this room."""


class Unavailable(ProgressServiceError):
    """A dependency (Redis, the database) did not answer in time; retry later."""


class CommentsUnavailable(Unavailable):
    """The comment could not be stored durably; nothing was broadcast."""


class Abandoned(Unavailable):
    """The caller gave up waiting; the transaction was rolled back."""


class SteerRefusal(ProgressServiceError):
    """Refused: ``code`` is the WebSocket error code (docs/protocol.md), ``message`` says why."""

    def __init__(self, code: SteerCode, message: str) -> None:
        super().__init__(message)
        self.code: SteerCode = code
        self.message = message


class SendTimeout(ProgressServiceError):
    """A frame could not be handed to the socket within the send timeout."""


class KeyFileError(ProgressServiceError):
    """The key file is missing, unreadable or malformed (the message says which)."""


class ClientError(ProgressServiceError):
    """The terminal client cannot do what was asked; ``str(exc)`` is the message for the user."""


class ApiError(ClientError):
    """An HTTP request failed; ``status`` is the response's status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FollowError(ClientError):
    """Following cannot go on; ``str(exc)`` says why, for the user."""
