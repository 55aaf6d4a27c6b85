"""Teams, users, memberships and API tokens (stored only as hashes)."""

from __future__ import annotations

import hashlib
import secrets
import uuid

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.events import REPORTER_ROLE, ROLE_RANK, ROLES
from progress_service.ids import now_ms
from progress_service.store.db import first_row
from progress_service.store.schema import api_tokens, memberships, teams, users

TOKEN_PREFIX = "ps_"


class Principal(msgspec.Struct, kw_only=True, frozen=True):
    """Who is calling: a user acting in one team with one role."""

    user_id: str
    user_name: str
    team_id: str
    team_name: str
    role: str
    token_id: str
    #: Epoch ms after which the credential is no longer valid (None: never).
    expires_at: int | None = None

    def at_least(self, role: str) -> bool:
        """True when this principal's role ranks at or above ``role``.

        A ``reporter`` is outside the ladder: it is not even a viewer.
        """
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]

    @property
    def is_reporter(self) -> bool:
        """True for a token that may only report sessions (and read nothing)."""
        return self.role == REPORTER_ROLE


def hash_token(token: str) -> str:
    """The stored form of a token or ticket."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh API token (256 bits of randomness)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)



async def _ensure_named(engine: AsyncEngine, table: sa.Table, name: str) -> str:
    """The id of ``table``'s row named ``name`` (teams, users), inserting it if needed."""
    async with engine.begin() as conn:
        found = await conn.scalar(sa.select(table.c.id).where(table.c.name == name))
        if found:
            return str(found)
        new_id = str(uuid.uuid4())
        await conn.execute(sa.insert(table).values(id=new_id, name=name, created_at=now_ms()))
        return new_id


async def ensure_team(engine: AsyncEngine, name: str) -> str:
    """The id of team ``name``, creating it if needed."""
    return await _ensure_named(engine, teams, name)


async def ensure_user(engine: AsyncEngine, name: str) -> str:
    """The id of user ``name``, creating it if needed."""
    return await _ensure_named(engine, users, name)


async def set_membership(engine: AsyncEngine, user_id: str, team_id: str, role: str) -> None:
    """Give ``user_id`` ``role`` in ``team_id`` (replacing an earlier role)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    async with engine.begin() as conn:
        await conn.execute(
            sa.delete(memberships).where(memberships.c.user_id == user_id, memberships.c.team_id == team_id)
        )
        await conn.execute(sa.insert(memberships).values(user_id=user_id, team_id=team_id, role=role))


async def create_token(
    engine: AsyncEngine,
    *,
    user: str,
    team: str,
    role: str,
    label: str = "",
    expires_in: int | None = None,
) -> tuple[str, str]:
    """Create user, team and membership as needed and a token for them.

    Returns ``(token, token_id)``; only the token's hash is stored.
    """
    team_id = await ensure_team(engine, team)
    user_id = await ensure_user(engine, user)
    await set_membership(engine, user_id, team_id, role)
    token = new_token()
    token_id = str(uuid.uuid4())
    now = now_ms()
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(api_tokens).values(
                id=token_id,
                token_hash=hash_token(token),
                user_id=user_id,
                team_id=team_id,
                label=label,
                created_at=now,
                expires_at=now + expires_in * 1000 if expires_in else None,
            )
        )
    return token, token_id


async def principal_for_token(engine: AsyncEngine, token: str) -> Principal | None:
    """The principal of a valid (known, unexpired, unrevoked) API token."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return await principal_for_token_hash(engine, hash_token(token))


async def token_revoked(engine: AsyncEngine, token: str) -> bool:
    """True when ``token`` is a known API token that was revoked (asked only after a refusal,
    so its holder can be told why; without the secret nothing can be learnt)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return False
    async with engine.connect() as conn:
        revoked_at = await conn.scalar(sa.select(api_tokens.c.revoked_at).where(api_tokens.c.token_hash == hash_token(token)))
    return revoked_at is not None


async def principal_for_token_hash(engine: AsyncEngine, token_hash: str) -> Principal | None:
    """Like :func:`principal_for_token`, from the stored hash (a web session keeps only that)."""
    query = (
        sa.select(
            api_tokens.c.id,
            api_tokens.c.expires_at,
            api_tokens.c.revoked_at,
            users.c.id.label("user_id"),
            users.c.name.label("user_name"),
            teams.c.id.label("team_id"),
            teams.c.name.label("team_name"),
            memberships.c.role,
        )
        .select_from(
            api_tokens.join(users, users.c.id == api_tokens.c.user_id)
            .join(teams, teams.c.id == api_tokens.c.team_id)
            .join(
                memberships,
                sa.and_(memberships.c.user_id == users.c.id, memberships.c.team_id == teams.c.id),
            )
        )
        .where(api_tokens.c.token_hash == token_hash)
    )
    row = await first_row(engine, query)
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now_ms():
        return None
    return Principal(
        user_id=row.user_id,
        user_name=row.user_name,
        team_id=row.team_id,
        team_name=row.team_name,
        role=row.role,
        token_id=row.id,
        expires_at=row.expires_at,
    )


async def token_expiry(engine: AsyncEngine, token_id: str) -> tuple[bool, int | None]:
    """``(usable, expires_at)``: usable is False once a token is revoked or deleted.

    ``expires_at`` (epoch ms or None) lets a caller that caches the answer
    still honour the expiry.
    """
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(api_tokens.c.expires_at, api_tokens.c.revoked_at).where(api_tokens.c.id == token_id)
            )
        ).first()
    if row is None or row.revoked_at is not None:
        return False, None
    return True, row.expires_at


async def token_is_live(engine: AsyncEngine, token_id: str) -> bool:
    """False once a token is revoked, expired or deleted."""
    usable, expires_at = await token_expiry(engine, token_id)
    return usable and (expires_at is None or expires_at > now_ms())


async def revoke_token(engine: AsyncEngine, token_id: str) -> bool:
    """Mark a token revoked. Returns False when it was unknown or already revoked."""
    async with engine.begin() as conn:
        res = await conn.execute(
            sa.update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now_ms())
        )
    return res.rowcount == 1
