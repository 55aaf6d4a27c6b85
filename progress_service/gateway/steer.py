"""A WebSocket ``steer`` or ``decide``: sent by the steering hook, acked once the CLI took it.

Like a comment, each runs as one of the session's bounded in-flight tasks:
waiting for the CLI's echo does not stop the receiver. The hook checks
role and job state and raises :class:`SteerRefusal` when it refuses.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Protocol

from progress_service import closes
from progress_service.errors import SteerRefusal
from progress_service.events import Ack, ClientDecide, ClientSteer, SteerResult
from progress_service.ids import job_id_of
from progress_service.outage import STORE_ERRORS
from progress_service.store.identity import Principal

if TYPE_CHECKING:
    from progress_service.gateway.session import Session


class SteeringHook(Protocol):
    """The gateway's steering hook (:class:`progress_service.steering.Steering`).

    Both return a result with the event id once the CLI took the input (or
    without one when the wait ran out) and raise a :class:`SteerRefusal`
    (``code``, ``message``) when it was refused.
    """

    async def instruct(self, principal: Principal, job_id: str, request_id: str, text: str) -> SteerResult: ...

    async def decide(
        self, principal: Principal, job_id: str, request_id: str, permission_id: str, allow: bool, message: str | None
    ) -> SteerResult: ...


async def steer(session: Session, message: ClientSteer | ClientDecide) -> None:
    """An instruction or a permission answer: checked and sent by the steering hook, acked when it arrived."""
    room_id, request_id = message.roomId, message.requestId
    job_id = job_id_of(room_id)
    if job_id not in session.rooms:
        session.request_close(closes.CHAT_BEFORE_JOIN)
        return
    hook = session.gateway.steering
    if hook is None:
        session.refuse("unavailable", "steering is not available", room_id=room_id, request_id=request_id, counts=False)
        return
    await session.in_flight(functools.partial(_send, session, hook, job_id, message))


async def _send(session: Session, hook: SteeringHook, job_id: str, message: ClientSteer | ClientDecide) -> None:
    assert session.principal is not None
    room_id, request_id = message.roomId, message.requestId
    settings = session.settings
    # Bounded: the store's write plus the wait for the CLI, plus slack.
    limit = settings.store_timeout + settings.steer_ack_timeout + 5
    try:
        async with asyncio.timeout(limit):
            if isinstance(message, ClientSteer):
                result = await hook.instruct(session.principal, job_id, request_id, message.text)
            else:
                result = await hook.decide(
                    session.principal, job_id, request_id, message.permissionId, message.allow, message.message
                )
    except STORE_ERRORS:
        session.refuse("unavailable", "not sent; retry with the same requestId", room_id=room_id, request_id=request_id, counts=False)
        return
    except SteerRefusal as exc:
        counts = exc.code in ("forbidden", "invalid")
        session.refuse(exc.code, exc.message, room_id=room_id, request_id=request_id, counts=counts)
        return
    if result.eventId is None:
        session.refuse(
            "timeout", "not delivered yet; send it again with the same requestId to learn the outcome",
            room_id=room_id, request_id=request_id, counts=False,
        )
        return
    session.put(Ack(requestId=request_id, id=result.eventId))
