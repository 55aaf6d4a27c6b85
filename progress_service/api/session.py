"""``/api/session``: sign the web page in with a cookie, read its CSRF secret, sign out."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import Meta

from progress_service.api.deps import error_responses, principal_for_cookie
from progress_service.api.me import Me, me_of
from progress_service.services import Services
from progress_service.store.identity import hash_token, principal_for_token, principal_for_token_hash
from progress_service.web_session import COOKIE_NAME, create_session, delete_session, read_session
from progress_service.ids import now_ms


class SignIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    token: Annotated[str, Meta(min_length=1, max_length=512)]


class SessionInfo(msgspec.Struct, kw_only=True):
    """The signed-in user and the secret to send as ``X-CSRF-Token``; both None when signed out."""

    me: Me | None
    csrf: str | None


def _cookie(request: Request[Any, Any, Any], value: str, max_age: int) -> Cookie:
    return Cookie(
        key=COOKIE_NAME,
        value=value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


class SessionController(Controller):
    path = "/api/session"
    tags = ["auth"]

    @post("/", status_code=HTTP_201_CREATED, summary="Exchange an API token for a session cookie", responses=error_responses(401, 403))
    async def sign_in(self, request: Request[Any, Any, Any], data: SignIn, services: Services) -> Response[SessionInfo]:
        """Sets an HttpOnly, SameSite=Strict cookie; tools keep using ``Authorization: Bearer``."""
        token = data.token.strip()
        principal = await principal_for_token(services.engine, token)
        if principal is None:
            raise NotAuthorizedException("that token was refused: it is invalid, expired or revoked")
        if principal.is_reporter:
            raise PermissionDeniedException("a reporter token may only post to /api/hooks/claude-code; it cannot sign in")
        ttl = services.settings.session_ttl
        if principal.expires_at is not None:
            ttl = min(ttl, max(1, (principal.expires_at - now_ms()) // 1000))
        old = request.cookies.get(COOKIE_NAME)
        if old:
            await delete_session(services.redis, old)
        session_id, record = await create_session(services.redis, hash_token(token), ttl)
        info = SessionInfo(me=me_of(principal), csrf=record.csrf)
        return Response(info, status_code=HTTP_201_CREATED, cookies=[_cookie(request, session_id, ttl)])

    @get("/", summary="The cookie session's user and CSRF secret", responses=error_responses())
    async def current(self, request: Request[Any, Any, Any], services: Services) -> Response[SessionInfo]:
        """A new tab calls this to learn whether it is signed in (scripts cannot read the cookie).

        Signed out is an answer, not an error: ``{"me": null, "csrf": null}``
        (and a stale cookie is cleared).
        """
        session_id = request.cookies.get(COOKIE_NAME)
        record = await read_session(services.redis, session_id) if session_id else None
        principal = await principal_for_token_hash(services.engine, record.tokenHash) if record else None
        if record is None or principal is None:
            cookies = [_cookie(request, "", 0)] if session_id else []
            return Response(SessionInfo(me=None, csrf=None), cookies=cookies)
        return Response(SessionInfo(me=me_of(principal), csrf=record.csrf))

    @delete("/", status_code=HTTP_204_NO_CONTENT, summary="Sign out: end the session and clear its cookie", responses=error_responses(401, 403))
    async def sign_out(self, request: Request[Any, Any, Any], services: Services) -> Response[None]:
        """Needs the CSRF header, like every state-changing call made with the cookie."""
        session_id = request.cookies.get(COOKIE_NAME)
        if session_id:
            await principal_for_cookie(request, services)  # checks X-CSRF-Token
            await delete_session(services.redis, session_id)
        return Response(None, status_code=HTTP_204_NO_CONTENT, cookies=[_cookie(request, "", 0)])
