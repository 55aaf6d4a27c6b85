"""Dependencies shared by the HTTP controllers: the process's components and the caller.

:data:`DEPENDENCIES` is what ``create_app`` hands Litestar: a handler names
the part it needs (``services``, ``gateway``, ``comments``, ``steering``,
``audit``, ``hooks``, ``jobs``, ``principal``) as a typed parameter.
:data:`AUTHENTICATION` (middleware) makes ``request.user`` the caller's
:class:`Principal`; :func:`requires` is the role guard of a controller or route.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import (
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import Guard

from progress_service import outage
from progress_service.auth import request_credential
from progress_service.comments import Comments
from progress_service.gateway import Gateway
from progress_service.hooks.gate import HookGate
from progress_service.jobs import Jobs
from progress_service.services import Services
from progress_service.state import services_of
from progress_service.steering import Steering
from progress_service.store.audit import Audit
from progress_service.store.identity import Principal, principal_for_token, principal_for_token_hash, token_revoked
from progress_service.web_session import COOKIE_NAME, CSRF_HEADER, SAFE_METHODS, csrf_ok, delete_session, read_session


async def provide_services(state: State) -> Services:
    """The process's components and connections, built in the lifespan."""
    services: Services = state.services
    return services


async def provide_gateway(state: State) -> Gateway:
    """This process's gateway (sessions, hub, SSE streams)."""
    return (await provide_services(state)).gateway


async def provide_comments(state: State) -> Comments:
    """The process's comments writer."""
    return (await provide_services(state)).comments


async def provide_steering(state: State) -> Steering:
    """The process's steering (instructions, permission answers)."""
    return (await provide_services(state)).steering


async def provide_audit(state: State) -> Audit:
    """The process's non-blocking audit writer."""
    return (await provide_services(state)).audit


async def provide_jobs(state: State) -> Jobs:
    """The jobs service (submit, cancel)."""
    return (await provide_services(state)).jobs


async def provide_hooks(state: State) -> HookGate:
    """The Claude Code hook route's per-process state."""
    return (await provide_services(state)).hooks


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], services: Services) -> Principal:
    """The caller of an API request, from ``Authorization: Bearer <token>``.

    Only API tokens are accepted here: tickets are for the WebSocket alone.
    Without that header, the web page's session cookie (see ``web_session``)
    is accepted, with its CSRF header on state-changing methods.
    """
    credential = request_credential(connection.headers, connection.cookies)
    if credential is None:
        raise NotAuthorizedException(
            "missing credentials: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if credential.kind == "cookie":
        principal = await principal_for_cookie(connection, services)
    else:
        found = await principal_for_token(services.engine, credential.secret)
        if found is None:
            detail = (
                "this API token was revoked; ask an admin for a new one"
                if await token_revoked(services.engine, credential.secret)
                else "invalid, expired or revoked token"
            )
            raise NotAuthorizedException(detail, headers={"WWW-Authenticate": "Bearer"})
        principal = found
    if principal.is_reporter:
        # A reporter token sits on laptops and CI runners: it reports, never reads.
        raise PermissionDeniedException("a reporter token may only post to /api/hooks/claude-code")
    # Later requests with this credential count as this user (http_limits).
    services.http_limit.remember(connection, principal)
    return principal


class PrincipalMiddleware(AbstractAuthenticationMiddleware):
    """Authentication as middleware: ``request.user`` is the caller's :class:`Principal` (see :func:`authenticate`)."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        """Refuse with 401/403, or name the caller."""
        return AuthenticationResult(user=await authenticate(connection, services_of(connection.app)), auth=None)


#: Routes that take no API credentials: health and metrics, the schema, the
#: cookie session's own routes, Claude Code hooks (reporter tokens, their own
#: checks). The static page is excluded by its routers' ``opt`` (NO_AUTH).
PUBLIC_PATHS = ["^/healthz$", "^/readyz$", "^/metrics$", "^/schema", "^/api/session", "^/api/hooks/"]
#: ``opt`` of a route that needs no credentials.
NO_AUTH: dict[str, Any] = {"exclude_from_auth": True}

#: The authentication middleware of the app (HTTP only: ``/ws`` authenticates in its first message).
AUTHENTICATION = DefineMiddleware(PrincipalMiddleware, exclude=PUBLIC_PATHS, scopes={ScopeType.HTTP})


async def provide_principal(request: Request[Principal, None, State]) -> Principal:
    """The caller, as the authentication middleware found it."""
    return request.user


def requires(role: str) -> Guard:
    """A guard refusing with 403 unless the caller's role ranks at or above ``role``."""

    # async although it never awaits: Litestar runs a sync guard in a worker thread.
    async def guard(connection: ASGIConnection[Any, Principal, Any, Any], _: BaseRouteHandler) -> None:
        require_role(connection.user, role)

    return guard


async def principal_for_cookie(request: ASGIConnection[Any, Any, Any, Any], services: Services) -> Principal:
    """The principal of a session cookie; 401 when it is gone, 403 without its CSRF header."""
    session_id = request.cookies.get(COOKIE_NAME, "")
    record = await read_session(services.redis, session_id)
    principal = await principal_for_token_hash(services.engine, record.tokenHash) if record else None
    if record is None or principal is None:
        if record is not None:
            await delete_session(services.redis, session_id)  # its token was revoked or expired
        raise NotAuthorizedException("your session has ended: sign in again")
    if request.scope.get("method") not in SAFE_METHODS and not csrf_ok(record, request.headers.get(CSRF_HEADER)):
        raise PermissionDeniedException("missing or wrong X-CSRF-Token header (read it from GET /api/session)")
    return principal


#: The app's dependencies (``Litestar(dependencies=...)``).
DEPENDENCIES: dict[str, Provide] = {
    "services": Provide(provide_services),
    "gateway": Provide(provide_gateway),
    "comments": Provide(provide_comments),
    "steering": Provide(provide_steering),
    "audit": Provide(provide_audit),
    "hooks": Provide(provide_hooks),
    "jobs": Provide(provide_jobs),
    "principal": Provide(provide_principal),
}


def require_role(principal: Principal, role: str) -> None:
    """Refuse with 403 unless the caller's role ranks at or above ``role``."""
    if not principal.at_least(role):
        raise PermissionDeniedException(f"this needs the role '{role}' or above; you are '{principal.role}'")


#: The bound of what the store (SQL BIGINT) can hold; a
#: number outside it is a client mistake (400), not a driver overflow (500).
INT64_MAX = (1 << 63) - 1


def int64_cursor(cursor: str | None, field: str = "cursor") -> int | None:
    """A numeric page cursor as an int, or a 400 naming ``field``."""
    if cursor is None:
        return None
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19 or int(cursor) > INT64_MAX:
        raise ValidationException(f"{field}: not a cursor returned by this API")
    return int(cursor)


def check_int64(value: int, field: str) -> int:
    """``value`` if a SQL BIGINT holds it, else a 400 naming ``field``."""
    if not -INT64_MAX <= value <= INT64_MAX:
        raise ValidationException(f"{field}: out of range")
    return value



class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of every 4xx/5xx answer: what is wrong, and where."""

    status_code: int
    detail: str
    #: Per-field problems of a validation error (or extra context).
    extra: list[dict[str, Any]] | dict[str, Any] | None = None


_ERROR_TEXT = {
    400: "Malformed request (the body names the field and the reason)",
    401: "Missing, invalid, expired or revoked token",
    403: "The caller's role is too low",
    404: "No such job (another team's job answers the same)",
    409: "Conflict: an Idempotency-Key reused for a different comment, a session job asked to cancel, "
    "or a session id another team reports",
    413: "Request body over the size limit",
    429: "Over PS_HTTP_RATE_LIMIT requests per minute; see Retry-After",
    503: "The store is unavailable; retry",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error statuses a handler answers, so clients
    (and schema-driven testers) know them."""
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_ERROR_TEXT[code], generate_examples=False)
        for code in (*codes, 429)  # the rate limit answers every API route
    }


def unavailable(detail: str) -> ServiceUnavailableException:
    """A 503 saying ``detail``, with the service's one ``Retry-After``."""
    return ServiceUnavailableException(detail, headers={"Retry-After": str(outage.RETRY_AFTER_SECONDS)})
