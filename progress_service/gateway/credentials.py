"""Whose credential a connection's ``auth`` carries, and whether it may watch.

:func:`verify` answers a principal, or None after closing the connection
with the code that tells the client why (``AUTH_FAILED``, ``REVOKED``,
1011 during a store outage). What the session does with a principal (the
connection cap, the identity kept over refreshes, the expiry timer) stays
in ``session``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from progress_service import closes, outage
from progress_service.auth import authenticate, cached_principal
from progress_service.outage import STORE_ERRORS
from progress_service.store.identity import Principal, token_revoked

if TYPE_CHECKING:
    from progress_service.gateway.session import Session


async def verify(session: Session, token: str) -> Principal | None:
    """The principal ``token`` stands for, or None once ``session`` is closing (refused or closed meanwhile)."""
    gateway = session.gateway
    principal = cached_principal(gateway.principals, token)
    if principal is None:
        try:
            # The store gate bounds each read (store_timeout) and the queue
            # before it (ws_store_wait), so a reconnect storm waits. Its
            # timeouts are asyncio's, not anyio.fail_after: an anyio scope
            # with a deadline costs a task lookup and a timer handle more,
            # ~10 % of a connect. Connections of one token that wait for its
            # read under way hold no place in the gate (and set no timer).
            principal = await authenticate(gateway.engine, gateway.redis, token, cache=gateway.principals,
                                           gate=gateway.store_gate.call)
        except STORE_ERRORS as exc:
            outage.warn(outage.classify(exc) or "store", "WebSocket auth", exc)
            session.request_close(closes.INTERNAL)
            return None
        if session.closing:
            return None
    if principal is None:
        session.audit("auth.failed", reason="invalid, expired, revoked or reused credential")
        session.request_close(closes.REVOKED if await _revoked(session, token) else closes.AUTH_FAILED)
        return None
    if principal.is_reporter:
        # Reporter tokens report Claude Code sessions over HTTP; they read nothing.
        session.audit("auth.failed", reason="a reporter token cannot watch")
        session.request_close(closes.AUTH_FAILED)
        return None
    return principal


async def _revoked(session: Session, secret: str) -> bool:
    """After a refusal: was ``secret`` an API token that got revoked? (tells its holder why)."""
    engine = session.gateway.engine
    try:
        return await session.gateway.store_gate.call(lambda: token_revoked(engine, secret))
    except STORE_ERRORS:
        return False
