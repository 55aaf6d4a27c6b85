"""Versioned schema migrations, so an upgrade keeps the data it finds.

Each step is a function applied once, in order, inside a transaction; the
``schema_version`` table records which ran. Add a step at the end, never edit
one that has shipped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service.store import history, schema

Step = Callable[[AsyncConnection], Awaitable[None]]


async def _v1_initial(conn: AsyncConnection) -> None:
    tables = [t for name, t in schema.metadata.tables.items() if name != "schema_version"]
    await conn.run_sync(lambda sync: schema.metadata.create_all(sync, tables=tables))


async def _v2_audit_heads(conn: AsyncConnection) -> None:
    # v1 creates every table of the current metadata, so on a fresh database
    # this table exists already; on one made before v2 it does not.
    await conn.run_sync(lambda sync: schema.audit_heads.create(sync, checkfirst=True))


async def _v3_event_archive(conn: AsyncConnection) -> None:
    # The job event archive (store/history.py): new tables only, nothing to convert.
    await conn.run_sync(lambda sync: history.job_events.create(sync, checkfirst=True))
    await conn.run_sync(lambda sync: history.job_history_pruned.create(sync, checkfirst=True))


MIGRATIONS: list[tuple[int, str, Step]] = [
    (1, "initial schema", _v1_initial),
    (2, "audit chain heads", _v2_audit_heads),
    (3, "job event archive", _v3_event_archive),
]


async def current_version(conn: AsyncConnection) -> int:
    """The newest applied migration, 0 for an empty database."""
    await conn.run_sync(lambda sync: schema.schema_version.create(sync, checkfirst=True))
    value = await conn.scalar(sa.select(sa.func.max(schema.schema_version.c.version)))
    return int(value or 0)


async def migrate(engine: AsyncEngine) -> list[str]:
    """Apply every pending migration; returns the names of those applied."""
    applied: list[str] = []
    async with engine.begin() as conn:
        version = await current_version(conn)
    for number, name, step in MIGRATIONS:
        if number <= version:
            continue
        async with engine.begin() as conn:
            await step(conn)
            await conn.execute(sa.insert(schema.schema_version).values(version=number, applied_at=int(time.time())))
        applied.append(f"{number}: {name}")
    return applied
