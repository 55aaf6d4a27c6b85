"""``GET /api/me``: who the caller is (so clients can show it and hide what the role forbids)."""

from __future__ import annotations

import msgspec
from litestar import get

from progress_service.api.deps import error_responses
from progress_service.store.identity import Principal


class Me(msgspec.Struct, kw_only=True):
    userId: str
    userName: str
    teamId: str
    teamName: str
    role: str
    #: Epoch ms after which the token stops working (None: never).
    expiresAt: int | None


def me_of(principal: Principal) -> Me:
    """The public view of a principal."""
    return Me(
        userId=principal.user_id,
        userName=principal.user_name,
        teamId=principal.team_id,
        teamName=principal.team_name,
        role=principal.role,
        expiresAt=principal.expires_at,
    )


@get("/api/me", tags=["auth"], summary="The caller's user, team and role", responses=error_responses(401))
async def whoami(principal: Principal) -> Me:
    return me_of(principal)
