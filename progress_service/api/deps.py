"""Dependencies shared by the HTTP controllers: services and the caller."""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from progress_service.auth import bearer_token
from progress_service.services import Services
from progress_service.store.identity import Principal, principal_for_token


async def provide_services(state: State) -> Services:
    """The process's shared resources, created in the lifespan."""
    return state.services


async def provide_principal(request: Request, state: State) -> Principal:
    """The caller of an API request, from ``Authorization: Bearer <token>``.

    Only API tokens are accepted here: tickets are for the WebSocket alone.
    """
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException(
            "missing credentials: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = await principal_for_token(state.services.engine, token)
    if principal is None:
        raise NotAuthorizedException("invalid, expired or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_role(principal: Principal, role: str) -> None:
    """Refuse with 403 unless the caller's role ranks at or above ``role``."""
    if not principal.at_least(role):
        raise PermissionDeniedException(f"this needs the role '{role}' or above; you are '{principal.role}'")
