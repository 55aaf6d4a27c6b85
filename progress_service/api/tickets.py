"""``POST /api/ws-tickets``: single-use credentials for the WebSocket."""

from __future__ import annotations

import msgspec
from litestar import post
from litestar.status_codes import HTTP_201_CREATED

from progress_service.api.deps import error_responses
from progress_service.auth import issue_ticket
from progress_service.services import Services
from progress_service.store.identity import Principal


class Ticket(msgspec.Struct, kw_only=True):
    ticket: str
    expiresIn: int


@post(
    "/api/ws-tickets",
    status_code=HTTP_201_CREATED,
    tags=["auth"],
    summary="A single-use WebSocket ticket",
    responses=error_responses(401),
)
async def create_ticket(principal: Principal, services: Services) -> Ticket:
    """A ticket to send as ``auth.token`` on ``/ws``; used once, valid for 60 s."""
    ttl = services.settings.ticket_ttl
    return Ticket(ticket=await issue_ticket(services.redis, principal, ttl), expiresIn=ttl)
