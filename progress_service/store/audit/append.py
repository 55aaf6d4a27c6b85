"""Appending records: the SQL that extends a chain under its lock.

**Serializing appends.** The chain's row in ``audit_heads`` is its lock: an
append first writes to it with an upsert that creates it on first use and
otherwise changes nothing (``INSERT … ON CONFLICT (chain) DO UPDATE …
RETURNING count, last_hash``), which locks the row and reads the chain's
state in one statement. On PostgreSQL that row lock (the one ``SELECT … FOR
UPDATE`` would take) orders concurrent appenders of one chain, across
processes; on SQLite the first write takes the database's single write lock
(busy_timeout waits for it), which orders every writer. Batches that touch
several chains lock them in sorted order so two nodes cannot deadlock.

Every record is keyed with the process's current audit key (see
``keys.py``); its id is stored in ``key_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service import metrics
from progress_service.ids import now_ms
from progress_service.store.audit import keys as audit_keys
from progress_service.store.audit.chain import (
    GENESIS,
    SYSTEM_CHAIN,
    AuditRecord,
    Entry,
    canonical_json,
    compute_hash,
    scrub,
)
from progress_service.store.db import dialect_insert
from progress_service.store.schema import audit_heads, audit_log, teams

audit_records = Counter("ps_audit_records_total", "Audit records written", ["action"], registry=metrics.registry)

# Statements are built once and executed with bound parameters: building
# ``insert().values(**kw)`` per call costs more CPU than the SQL itself
# (statement construction plus a cache key over the literal values).

#: Per dialect: the chain lock (see the module docstring).
_LOCK_CHAIN: dict[str, Any] = {}
_INSERT_RECORDS = sa.insert(audit_log).returning(audit_log.c.id, audit_log.c.hash)
_UPDATE_HEAD = (
    sa.update(audit_heads)
    .where(audit_heads.c.chain == sa.bindparam("b_chain"))
    .values(
        count=sa.bindparam("b_count"),
        last_id=sa.bindparam("b_last_id"),
        last_hash=sa.bindparam("b_last_hash"),
        updated_at=sa.bindparam("b_updated_at"),
    )
)


def _lock_statement(conn: AsyncConnection) -> Any:
    name = conn.dialect.name
    stmt = _LOCK_CHAIN.get(name)
    if stmt is None:
        insert = dialect_insert(conn, audit_heads)
        # An upsert that changes nothing: it creates the head on first use and
        # otherwise locks the existing row (PostgreSQL: ON CONFLICT DO UPDATE
        # takes the row lock, as SELECT … FOR UPDATE does; SQLite: it is a
        # write, so it takes the database's write lock), and returns the
        # chain's count and last hash in the same round trip.
        stmt = _LOCK_CHAIN[name] = insert.on_conflict_do_update(
            index_elements=["chain"], set_={"chain": insert.excluded.chain}
        ).returning(audit_heads.c.count, audit_heads.c.last_hash)
    return stmt


async def _lock_chain(conn: AsyncConnection, chain: str) -> tuple[int, str]:
    """Take the chain's lock for this transaction; returns (count, last hash)."""
    row = (
        await conn.execute(
            _lock_statement(conn),
            {"chain": chain, "count": 0, "last_id": None, "last_hash": GENESIS, "updated_at": now_ms()},
        )
    ).one()
    return int(row._mapping["count"]), row.last_hash


def _fit(e: Entry) -> Entry:
    """The entry with its short fields clipped to their column sizes."""
    if len(e.action) <= 50 and len(e.actor or "") <= 100 and len(e.room_id or "") <= 80:
        return e
    return Entry(
        action=e.action[:50],
        team_id=e.team_id,
        actor=e.actor[:100] if e.actor else e.actor,
        room_id=e.room_id[:80] if e.room_id else e.room_id,
        detail=e.detail,
        created_at=e.created_at,
    )


async def append(
    conn: AsyncConnection, entries: Sequence[Entry], *, keys: audit_keys.Keyring | None = None
) -> list[AuditRecord]:
    """Append ``entries`` inside the caller's transaction (commit is theirs).

    Each record is keyed with ``keys``' current key (default: the keyring
    bound to the engine, see :func:`keys.for_engine`).

    Records of one chain keep their given order; chains are locked in sorted
    order. Returns the records written, in the order of ``entries``.

    A chain's records are inserted with one multi-row statement; the ids it
    returns must ascend in chain order (``verify`` walks a chain by id). Both
    backends number the rows of one ``INSERT … VALUES`` in order, and the
    returned hashes are checked against that: a store that numbered them
    otherwise fails the append (the transaction rolls back) instead of
    writing a chain that does not verify.
    """
    ring = keys or audit_keys.for_engine(conn)
    key_id, secret = ring.current_id, ring.current_secret
    by_chain: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_chain.setdefault(entry.chain, []).append(i)
    written: dict[int, AuditRecord] = {}
    actions: dict[str, int] = {}
    for chain in sorted(by_chain):
        count, prev = await _lock_chain(conn, chain)
        rows: list[dict[str, Any]] = []
        records: list[tuple[int, AuditRecord]] = []
        for i in by_chain[chain]:
            e = _fit(entries[i])
            clean = scrub(e.detail)
            detail = canonical_json(clean)
            digest = compute_hash(
                prev_hash=prev,
                team_id=e.team_id,
                actor=e.actor,
                action=e.action,
                room_id=e.room_id,
                detail=detail,
                created_at=e.created_at,
                key_id=key_id,
                secret=secret,
            )
            rows.append(
                {
                    "team_id": e.team_id,
                    "actor": e.actor,
                    "action": e.action,
                    "room_id": e.room_id,
                    "detail": detail,
                    "created_at": e.created_at,
                    "prev_hash": prev,
                    "hash": digest,
                    "key_id": key_id,
                }
            )
            records.append(
                (
                    i,
                    AuditRecord(
                        id=0,
                        chain=chain,
                        teamId=e.team_id,
                        actor=e.actor,
                        action=e.action,
                        roomId=e.room_id,
                        detail=msgspec.json.decode(detail),
                        createdAt=e.created_at,
                        prevHash=prev,
                        hash=digest,
                        keyId=key_id,
                    ),
                )
            )
            actions[e.action] = actions.get(e.action, 0) + 1
            prev = digest
            count += 1
        if len(rows) == 1:
            returned: Sequence[sa.Row[Any]] = [(await conn.execute(_INSERT_RECORDS, rows[0])).one()]
        else:
            returned = (await conn.execute(_INSERT_RECORDS, rows)).all()
        ids = sorted((int(r.id), r.hash) for r in returned)
        if [h for _, h in ids] != [row["hash"] for row in rows]:
            raise RuntimeError(f"audit: the store numbered the records of chain {chain} out of order")
        for (i, rec), (row_id, _) in zip(records, ids, strict=True):
            rec.id = row_id
            written[i] = rec
        await conn.execute(
            _UPDATE_HEAD,
            {"b_chain": chain, "b_count": count, "b_last_id": ids[-1][0], "b_last_hash": prev, "b_updated_at": now_ms()},
        )
    for action, n in actions.items():
        audit_records.labels(action).inc(n)
    return [written[i] for i in range(len(entries))]


async def record(
    engine: AsyncEngine,
    *,
    action: str,
    team_id: str | None,
    actor: str | None = None,
    room_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditRecord:
    """Append one record in its own transaction (durable when this returns)."""
    async with engine.begin() as conn:
        (rec,) = await append(
            conn, [Entry(action=action, team_id=team_id, actor=actor, room_id=room_id, detail=detail or {})]
        )
    return rec


def chain_filter(chain: str) -> Any:
    """The WHERE clause selecting one chain's records."""
    return audit_log.c.team_id.is_(None) if chain == SYSTEM_CHAIN else audit_log.c.team_id == chain


async def team_id_for(engine: AsyncEngine, team: str) -> str | None:
    """The id of a team given by name (or by id)."""
    async with engine.connect() as conn:
        tid = await conn.scalar(sa.select(teams.c.id).where(teams.c.name == team))
        if tid is None:
            tid = await conn.scalar(sa.select(teams.c.id).where(teams.c.id == team))
    return tid


async def record_for_team_name(
    engine: AsyncEngine, *, action: str, team_name: str, actor: str | None, detail: dict[str, Any] | None = None
) -> AuditRecord:
    """Append one record for the team called ``team_name`` (the CLI's way)."""
    return await record(engine, action=action, team_id=await team_id_for(engine, team_name), actor=actor, detail=detail)


