"""A WebSocket ``chat``: checked here, stored by the comments hook, acked.

The checks run in the protocol's order: room joined (else close 1008),
text after trimming (length, control characters: close 1008), role, the
connection's chat rate (``rate_limited``; past ``ABUSE_WINDOW``'s budget,
close 4429). The comment is then stored as one of the session's in-flight
tasks, so the receiver goes on reading meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import TYPE_CHECKING, Protocol

from progress_service import closes
from progress_service.errors import CommentForbidden, CommentsUnavailable
from progress_service.events import Ack, ClientChat
from progress_service.gateway.limits import TokenBucket, WindowBudget
from progress_service.ids import job_id_of
from progress_service.outage import STORE_ERRORS
from progress_service.store.identity import Principal

if TYPE_CHECKING:
    from progress_service.gateway.session import Session
    from progress_service.settings import Settings

#: Control characters other than tab and newline are refused in chat text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Window (s) in which more than ``ws_chat_burst`` rate-limited chats close 4429.
ABUSE_WINDOW = 10.0


class CommentsHook(Protocol):
    """The gateway's chat hook (:class:`progress_service.comments.Comments`).

    ``post`` stores the comment and its audit record, appends it to the job
    stream (so the hub broadcasts it) and returns its event id; the same
    ``(room, user, request_id)`` returns the same id without a second copy.
    """

    async def post(self, principal: Principal, room_id: str, job_id: str, request_id: str, text: str) -> str: ...


class ChatRate:
    """One connection's chat rate: a token bucket, and a budget of refusals before close 4429.

    Made on a connection's first chat: most connections never chat.
    """

    __slots__ = ("abuse", "bucket")

    def __init__(self, settings: Settings) -> None:
        self.bucket = TokenBucket(settings.ws_chat_rate, settings.ws_chat_burst)
        self.abuse = WindowBudget(settings.ws_chat_burst, ABUSE_WINDOW)


async def chat(session: Session, message: ClientChat) -> None:
    """Check one ``chat`` and start storing it (acked when stored), or answer why not."""
    assert session.principal is not None
    settings = session.settings
    room_id, request_id = message.roomId, message.requestId
    job_id = job_id_of(room_id)
    if job_id not in session.rooms:
        session.request_close(closes.CHAT_BEFORE_JOIN)
        return
    text = message.text.strip()
    if not 1 <= len(text) <= settings.ws_max_text_chars:
        session.request_close(closes.policy(f"text: 1-{settings.ws_max_text_chars} characters after trimming"))
        return
    if _CONTROL.search(text):
        session.request_close(closes.policy("text: control characters other than newline and tab"))
        return
    if not session.principal.at_least("reviewer"):
        session.refuse("forbidden", "your role may not comment", room_id=room_id, request_id=request_id)
        return
    rate = session.chat_rate
    if rate is None:
        rate = session.chat_rate = ChatRate(settings)
    if not rate.bucket.take():
        if not rate.abuse.hit():
            session.request_close(closes.RATE_LIMITED)
            return
        session.refuse("rate_limited", "too many comments; slow down", room_id=room_id, request_id=request_id, counts=False)
        return
    hook = session.gateway.comments
    if hook is None:
        session.refuse("unavailable", "comments are not available", room_id=room_id, request_id=request_id, counts=False)
        return
    # The receiver goes on reading while the comment is stored (the seed
    # and clients keep several in flight): the writer groups them, and a
    # group shares one transaction, one XADD and one frame per watcher.
    # The posts are this session's tasks, bounded, cancelled at teardown;
    # they enter the writer's queue in the order they were received.
    await session.in_flight(functools.partial(_post, session, hook, room_id, job_id, request_id, text))


async def _post(session: Session, hook: CommentsHook, room_id: str, job_id: str, request_id: str, text: str) -> None:
    """Store and publish one comment, then ack it (or answer why not)."""
    assert session.principal is not None
    try:
        async with asyncio.timeout(session.settings.store_timeout):  # see credentials.verify
            event_id = await hook.post(session.principal, room_id, job_id, request_id, text)
    except CommentForbidden:
        session.refuse("forbidden", "you may not comment here", room_id=room_id, request_id=request_id)
        return
    except (CommentsUnavailable, *STORE_ERRORS):
        session.refuse("unavailable", "the comment was not stored; retry", room_id=room_id, request_id=request_id, counts=False)
        return
    session.put(Ack(requestId=request_id, id=event_id))
