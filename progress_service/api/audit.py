"""Admin API: the team's audit log (``/api/audit``) and its tokens (``/api/tokens``).

Both need the role ``admin`` and only ever show the caller's team: its audit
chain (records of other teams and of the team-less ``system`` chain are the
operator's, through ``progress-service audit export``) and its tokens
(never their hashes). Revoking a token closes its live WebSocket
connections on every node with 4403 `token revoked` within seconds.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get
from litestar import delete as delete_route
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from progress_service.api.deps import (
    check_int64,
    error_responses,
    int64_cursor,
    requires,
)
from progress_service.ids import is_room_id
from progress_service.revocation import TokenInfo, list_tokens, revoke
from progress_service.services import Services
from progress_service.store import audit as audit_store
from progress_service.store.audit import AuditRecord, parse_since
from progress_service.store.identity import Principal


class AuditPage(msgspec.Struct, kw_only=True):
    items: list[AuditRecord]
    #: Pass as ``cursor`` for the next page; None on the last page.
    nextCursor: str | None


class TokenList(msgspec.Struct, kw_only=True):
    items: list[TokenInfo]


_ACTION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,50}$")
_TOKEN_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,36}$")


def _cursor(cursor: str | None) -> int | None:
    return int64_cursor(cursor)


class AuditController(Controller):
    path = "/api/audit"
    tags = ["audit"]
    guards = [requires("admin")]

    @get("/", summary="The team's audit log (admin)", responses=error_responses(401, 403))
    async def list_audit(
        self,
        principal: Principal,
        services: Services,
        action: Annotated[
            str | None, Parameter(max_length=50, description="e.g. comment.create; a trailing '.' matches a prefix")
        ] = None,
        since: Annotated[
            str | None, Parameter(max_length=40, description="ISO 8601 time, epoch ms, or relative like 24h")
        ] = None,
        room: Annotated[str | None, Parameter(max_length=80, description="job:<id>")] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Parameter(description="nextCursor of the previous page")] = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> AuditPage:
        """Records of the caller's team, oldest first (``order=desc``: newest first)."""
        # Checked here, not left to the SQL driver: PostgreSQL refuses NUL in
        # text with an error (500) where SQLite would just find nothing.
        if action is not None and not _ACTION_RE.match(action):
            raise ValidationException("action: letters, digits and . _ : - only")
        if room is not None and not is_room_id(room):
            raise ValidationException("room: a room id like job:<id>")
        try:
            since_ms = parse_since(since) if since else None
        except (ValueError, OverflowError) as exc:
            raise ValidationException(f"since: {exc}") from None
        if since_ms is not None:
            check_int64(since_ms, "since")
        limit = min(limit, services.settings.page_max)
        position = _cursor(cursor)
        items = await audit_store.list_records(
            services.engine,
            team_id=principal.team_id,
            action=action,
            since=since_ms,
            room_id=room,
            after_id=position if order == "asc" else None,
            before_id=position if order == "desc" else None,
            newest_first=order == "desc",
            limit=limit,
        )
        return AuditPage(items=items, nextCursor=str(items[-1].id) if len(items) == limit else None)


class TokensController(Controller):
    path = "/api/tokens"
    tags = ["auth"]
    guards = [requires("admin")]

    @get("/", summary="The team's API tokens, without secrets (admin)", responses=error_responses(401, 403))
    async def list_team_tokens(self, principal: Principal, services: Services) -> TokenList:
        return TokenList(items=await list_tokens(services.engine, principal.team_id))

    @delete_route(
        "/{token_id:str}",
        status_code=HTTP_200_OK,
        summary="Revoke a token (admin)",
        responses=error_responses(401, 403, 404),
    )
    async def revoke_token(self, token_id: str, principal: Principal, services: Services) -> TokenInfo:
        """Revoke one of the team's tokens; its live connections are closed with 4403 (token revoked)."""
        info = None
        if _TOKEN_ID_RE.match(token_id):  # anything else (a NUL would be a PostgreSQL error) is no token
            info = await revoke(
                services.engine,
                token_id,
                actor=principal.user_name,
                via="api",
                redis=services.redis,
                team_id=principal.team_id,
            )
        if info is None:
            raise NotFoundException("no such token")
        return info
