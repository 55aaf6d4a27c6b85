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


async def _v4_audit_keys(conn: AsyncConnection) -> None:
    # Keyed audit records: the key id of each record (NULL for the SHA-256
    # records written before) and the index the comments read path uses. A
    # database made by v1 from the current metadata has both already.
    def upgrade(sync: sa.Connection) -> None:
        inspector = sa.inspect(sync)
        if "key_id" not in {c["name"] for c in inspector.get_columns("audit_log")}:
            sync.execute(sa.text("ALTER TABLE audit_log ADD COLUMN key_id VARCHAR(32)"))
        if "ix_audit_room" not in {i["name"] for i in inspector.get_indexes("audit_log")}:
            sync.execute(sa.text("CREATE INDEX ix_audit_room ON audit_log (room_id, created_at)"))

    await conn.run_sync(upgrade)


#: Columns added to ``jobs`` by v5 (name -> DDL type and default).
_V5_JOB_COLUMNS = {
    "kind": "VARCHAR(20) NOT NULL DEFAULT 'job'",
    "source": "VARCHAR(20)",
    "host": "VARCHAR(200)",
}


async def _v5_job_kind(conn: AsyncConnection) -> None:
    # Session jobs (Claude Code hooks): what a job is and where it runs. A
    # fresh database got these columns from v1 already.
    present = await conn.run_sync(lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("jobs")})
    for name, ddl in _V5_JOB_COLUMNS.items():
        if name not in present:
            await conn.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN {name} {ddl}"))


MIGRATIONS: list[tuple[int, str, Step]] = [
    (1, "initial schema", _v1_initial),
    (2, "audit chain heads", _v2_audit_heads),
    (3, "job event archive", _v3_event_archive),
    (4, "keyed audit records", _v4_audit_keys),
    (5, "job kind, source and host", _v5_job_kind),
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
