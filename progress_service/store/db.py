"""Engine creation for SQLite (WAL) and PostgreSQL, one code path for both, and the lookups every store module makes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

#: An INSERT that can take ``ON CONFLICT`` clauses (both dialects spell them alike).
UpsertInsert = postgresql.Insert | sqlite.Insert


def normalize_url(url: str) -> str:
    """Accept plain ``sqlite:///`` and ``postgresql://`` URLs and pick the async drivers."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite files get WAL and a busy timeout."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def dialect_insert(conn: AsyncConnection, table: sa.Table) -> UpsertInsert:
    """``INSERT INTO table`` in the connection's dialect, so it can say ``ON CONFLICT``."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def of_team(query: sa.Select[Any], column: sa.ColumnElement[Any], team_id: str | None) -> sa.Select[Any]:
    """``query`` narrowed to the rows whose ``column`` is ``team_id``; None: every team's (an operator's lookup)."""
    return query if team_id is None else query.where(column == team_id)


async def first_row(engine: AsyncEngine, query: sa.Select[Any]) -> Row[Any] | None:
    """The first row ``query`` finds, read on a connection of its own; None when it finds none."""
    async with engine.connect() as conn:
        row: Row[Any] | None = (await conn.execute(query)).first()
    return row
