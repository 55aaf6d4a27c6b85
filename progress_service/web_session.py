"""Web sign-in sessions: an API token exchanged for an HttpOnly cookie.

The page posts its token once (``POST /api/session``); the server answers
with a random session id in an ``HttpOnly; SameSite=Strict`` cookie, so every
tab of that browser is signed in and no script can read the credential.
Redis keeps, under the session id's hash, only the *token's hash* and a CSRF
secret; the token itself is never stored. State-changing requests that
authenticate with the cookie must echo the CSRF secret in ``X-CSRF-Token``
(the page reads it from ``GET /api/session``): SameSite=Strict already keeps
other sites' requests cookie-less, the header also covers same-site
subdomains and old browsers.
"""

from __future__ import annotations

import hmac
import secrets

import msgspec
from redis.asyncio import Redis

from progress_service.keys import web_session_key

COOKIE_NAME = "ps_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class WebSession(msgspec.Struct, kw_only=True):
    """What Redis keeps for one cookie session."""

    tokenHash: str
    csrf: str


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(WebSession)


async def create_session(redis: Redis, token_hash: str, ttl: int) -> tuple[str, WebSession]:
    """A new session for the token with ``token_hash``; returns (cookie value, record)."""
    session_id = secrets.token_urlsafe(32)
    record = WebSession(tokenHash=token_hash, csrf=secrets.token_urlsafe(24))
    await redis.set(web_session_key(session_id), _enc.encode(record), ex=max(1, ttl))
    return session_id, record


async def read_session(redis: Redis, session_id: str) -> WebSession | None:
    """The session behind a cookie value, or None (unknown, expired, malformed)."""
    if not session_id or len(session_id) > 100:
        return None
    raw = await redis.get(web_session_key(session_id))
    if raw is None:
        return None
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError:
        return None


async def delete_session(redis: Redis, session_id: str) -> None:
    """End a session (sign-out)."""
    if session_id and len(session_id) <= 100:
        await redis.delete(web_session_key(session_id))


def csrf_ok(record: WebSession, sent: str | None) -> bool:
    """Constant-time check of the ``X-CSRF-Token`` header against the session's secret."""
    return sent is not None and hmac.compare_digest(record.csrf.encode(), sent.encode())
