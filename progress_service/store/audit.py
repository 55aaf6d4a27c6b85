"""The audit log: append-only, hash-chained records in the SQL store.

Every record carries ``prev_hash`` (the hash of the record before it in its
chain) and ``hash`` = SHA-256 over its own contents and ``prev_hash``. Editing
a record breaks its hash; deleting or reordering records breaks the next
record's ``prev_hash``; deleting the newest records is caught by the chain's
head row (count, id and hash of the last record), so ``verify`` detects every
one of them and names the record where the chain breaks.

**One chain per team** (plus one ``system`` chain for records that belong to
no team, such as an authentication failure with an unknown token). Why:

* a team is the service's tenancy boundary: a team's admin can export and
  verify *their* chain without seeing any other team's records, and the
  team's chain is complete on its own (nothing of another team is needed to
  check it);
* appends serialize per chain, not globally: a comment transaction holds its
  team's chain lock until it commits, so one busy team never makes every
  other team's comments wait behind it.

The price is that a record moved between chains, or a whole chain deleted
together with its head row, is not caught by another team's chain; the team
id is part of each hash, so moving is caught within the chain it lands in,
and exporting chains (``audit export``) to storage outside the database is
how an operator guards against an attacker who rewrites a whole chain.

**Serializing appends.** The chain's row in ``audit_heads`` is its lock: an
append first writes to it with an upsert that creates it on first use and
otherwise changes nothing (``INSERT … ON CONFLICT (chain) DO UPDATE …
RETURNING count, last_hash``), which locks the row and reads the chain's
state in one statement. On PostgreSQL that row lock (the one ``SELECT … FOR
UPDATE`` would take) orders concurrent appenders of one chain, across
processes; on SQLite the first write takes
the database's single write lock (busy_timeout waits for it), which orders
every writer. Batches that touch several chains lock them in sorted order so
two nodes cannot deadlock.

Security events are written through :class:`Audit`: ``record`` only puts the
record on a bounded queue (never blocking the caller, such as the gateway's
fan-out path) and a writer task appends queued records in batches. When the
queue is full a record is dropped and counted (``ps_audit_dropped_total``).
Comments never go through that queue: their audit record is written in the
comment's own transaction (see ``store/comments.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service import metrics
from progress_service.store.schema import audit_heads, audit_log, teams

log = logging.getLogger("progress_service.audit")

SYSTEM_CHAIN = "system"
GENESIS = "0" * 64
HASH_VERSION = 1

#: Detail keys that may carry a secret; their values never reach the log.
_SECRET_KEYS = frozenset({"token", "ticket", "secret", "authorization", "password", "access_token", "auth"})
_SECRET_PREFIXES = ("ps_", "pst_")

audit_records = Counter("ps_audit_records_total", "Audit records written", ["action"], registry=metrics.registry)
audit_dropped = Counter(
    "ps_audit_dropped_total", "Security audit records dropped because the queue was full", registry=metrics.registry
)
audit_queue = Gauge("ps_audit_queue", "Security audit records waiting to be written", registry=metrics.registry)


def now_ms() -> int:
    return int(time.time() * 1000)


_RELATIVE = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_since(value: str, *, now: int | None = None) -> int:
    """A point in time as epoch ms: ISO 8601 (UTC unless it says otherwise),
    epoch seconds or milliseconds, or an age such as ``90m``, ``24h``, ``7d``.
    """
    from datetime import UTC, datetime  # noqa: PLC0415

    text = value.strip()
    if not text:
        raise ValueError("empty time")
    if text[-1:].lower() in _RELATIVE and text[:-1].isdigit():
        return (now if now is not None else now_ms()) - int(text[:-1]) * _RELATIVE[text[-1].lower()]
    if text.isdigit():
        number = int(text)
        return number if number >= 10**11 else number * 1000  # ms vs s
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {value!r} (ISO 8601, epoch seconds/ms, or an age like 24h)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


# --------------------------------------------------------------------------
# Records and hashes
# --------------------------------------------------------------------------


class AuditRecord(msgspec.Struct, kw_only=True):
    """One audit record as the API and ``audit export`` show it."""

    id: int
    chain: str
    teamId: str | None
    actor: str | None
    action: str
    roomId: str | None
    detail: dict[str, Any]
    createdAt: int
    prevHash: str
    hash: str


@dataclass(frozen=True)
class Entry:
    """A record to append; ``created_at`` is when the event happened."""

    action: str
    team_id: str | None
    actor: str | None = None
    room_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created_at: int = field(default_factory=now_ms)

    @property
    def chain(self) -> str:
        return chain_of(self.team_id)


def chain_of(team_id: str | None) -> str:
    """The chain a record of ``team_id`` belongs to."""
    return team_id or SYSTEM_CHAIN


def scrub(detail: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``detail`` without anything that may be a credential."""
    if not detail:
        return {}
    clean: dict[str, Any] = {}
    for key, value in detail.items():
        if str(key).lower() in _SECRET_KEYS:
            clean[key] = "[redacted]"
        elif isinstance(value, str) and value.startswith(_SECRET_PREFIXES) and len(value) > 20:
            clean[key] = "[redacted]"
        elif isinstance(value, dict):
            clean[key] = scrub(value)
        else:
            clean[key] = value
    return clean


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace (what the hash covers)."""
    return msgspec.json.encode(value, order="sorted").decode()


def compute_hash(
    *,
    prev_hash: str,
    team_id: str | None,
    actor: str | None,
    action: str,
    room_id: str | None,
    detail: str,
    created_at: int,
) -> str:
    """SHA-256 of a record's contents and its predecessor's hash.

    ``detail`` is the stored JSON text, hashed exactly as stored.
    """
    material = canonical_json(
        {
            "v": HASH_VERSION,
            "prev": prev_hash,
            "team": team_id,
            "actor": actor,
            "action": action,
            "room": room_id,
            "detail": detail,
            "at": created_at,
        }
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _row_hash(row: Any) -> str:
    return compute_hash(
        prev_hash=row.prev_hash,
        team_id=row.team_id,
        actor=row.actor,
        action=row.action,
        room_id=row.room_id,
        detail=row.detail,
        created_at=row.created_at,
    )


def to_record(row: Any) -> AuditRecord:
    try:
        detail = msgspec.json.decode(row.detail)
    except msgspec.DecodeError:
        detail = {"raw": row.detail}
    return AuditRecord(
        id=row.id,
        chain=chain_of(row.team_id),
        teamId=row.team_id,
        actor=row.actor,
        action=row.action,
        roomId=row.room_id,
        detail=detail if isinstance(detail, dict) else {"value": detail},
        createdAt=row.created_at,
        prevHash=row.prev_hash,
        hash=row.hash,
    )


# --------------------------------------------------------------------------
# Appending
# --------------------------------------------------------------------------


def _dialect_insert(conn: AsyncConnection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # noqa: PLC0415
    else:
        from sqlalchemy.dialects.sqlite import insert  # noqa: PLC0415
    return insert(table)


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
        insert = _dialect_insert(conn, audit_heads)
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
    return int(row.count), row.last_hash


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


async def append(conn: AsyncConnection, entries: Sequence[Entry]) -> list[AuditRecord]:
    """Append ``entries`` inside the caller's transaction (commit is theirs).

    Records of one chain keep their given order; chains are locked in sorted
    order. Returns the records written, in the order of ``entries``.

    A chain's records are inserted with one multi-row statement; the ids it
    returns must ascend in chain order (``verify`` walks a chain by id). Both
    backends number the rows of one ``INSERT … VALUES`` in order, and the
    returned hashes are checked against that: a store that numbered them
    otherwise fails the append (the transaction rolls back) instead of
    writing a chain that does not verify.
    """
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
                    ),
                )
            )
            actions[e.action] = actions.get(e.action, 0) + 1
            prev = digest
            count += 1
        if len(rows) == 1:
            returned = [(await conn.execute(_INSERT_RECORDS, rows[0])).one()]
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


# --------------------------------------------------------------------------
# The non-blocking writer for security events
# --------------------------------------------------------------------------


#: Errors that retrying the same batch cannot cure.
_PERMANENT = (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError, TypeError, ValueError)


class Audit:
    """Security events, recorded without making the caller wait for the store.

    ``record`` enqueues (bounded); :meth:`run` — a task of the app's
    lifespan — appends what is queued in batches, retrying while the store
    is down. A full queue drops the new record and counts it.
    """

    def __init__(self, engine: AsyncEngine, *, maxsize: int = 10_000, batch: int = 200) -> None:
        self.engine = engine
        self.maxsize = maxsize
        self.batch = batch
        self.dropped = 0
        self.written = 0
        self._send, self._recv = anyio.create_memory_object_stream[Entry](max_buffer_size=maxsize)
        #: Set while nothing is queued or being written (made on first use).
        self._idle: anyio.Event | None = None
        self._pending = 0

    def record_nowait(
        self,
        *,
        action: str,
        team_id: str | None,
        actor: str | None = None,
        room_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> bool:
        """Queue a record from sync or async code; False when it was dropped."""
        clean = scrub(detail)
        try:
            canonical_json(clean)
        except (TypeError, ValueError):  # not JSON: keep what it said, never fail the caller
            clean = {"repr": repr(clean)[:1000]}
        entry = Entry(action=action, team_id=team_id, actor=actor, room_id=room_id, detail=clean)
        try:
            self._send.send_nowait(entry)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.dropped += 1
            audit_dropped.inc()
            log.warning("audit queue full: dropped %s record", action)
            return False
        self._pending += 1
        if self._idle is None or self._idle.is_set():
            self._idle = anyio.Event()
        audit_queue.set(self._pending)
        return True

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self) -> None:
        """Write queued records until cancelled; flushes what is queued on the way out."""
        try:
            while True:
                first = await self._recv.receive()
                batch = [first]
                while len(batch) < self.batch:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._write(batch)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                rest: list[Entry] = []
                while True:
                    try:
                        rest.append(self._recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                for i in range(0, len(rest), self.batch):
                    await self._write(rest[i : i + self.batch], retry=False)

    async def _write(self, batch: list[Entry], *, retry: bool = True) -> None:
        delay = 0.2
        while True:
            try:
                async with self.engine.begin() as conn:
                    await append(conn, batch)
                break
            except _PERMANENT:
                # Something in the batch can never be written: write the rest
                # one by one, and count what is refused as dropped.
                await self._write_each(batch)
                break
            except Exception:  # the store is down or busy: keep the batch, retry
                if not retry:
                    log.exception("audit: could not write %d records at shutdown", len(batch))
                    break
                log.warning("audit: store unavailable, retrying %d records in %.1fs", len(batch), delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.written += len(batch)
        self._pending -= len(batch)
        audit_queue.set(self._pending)
        if self._pending <= 0:
            self._pending = 0
            if self._idle is not None:
                self._idle.set()

    async def _write_each(self, batch: list[Entry]) -> None:
        for entry in batch:
            try:
                async with self.engine.begin() as conn:
                    await append(conn, [entry])
            except Exception:
                self.dropped += 1
                audit_dropped.inc()
                log.exception("audit: dropped a %s record the store refused", entry.action)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        with anyio.move_on_after(timeout):
            while self._pending > 0 and self._idle is not None:
                await self._idle.wait()
            return True
        return False


# --------------------------------------------------------------------------
# Reading: verify, list, export
# --------------------------------------------------------------------------


class Mismatch(msgspec.Struct, kw_only=True):
    """Where a chain breaks: the record (``id`` None for a missing tail) and why."""

    chain: str
    id: int | None
    position: int
    reason: str

    def describe(self) -> str:
        what = f"record id={self.id}" if self.id is not None else "chain head"
        return f"{what} (chain {self.chain}, #{self.position}): {self.reason}"


class VerifyResult(msgspec.Struct, kw_only=True):
    """What :func:`verify` found: records checked, chains, the first mismatch."""

    verified: int
    chains: int
    mismatch: Mismatch | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None


async def _chains(conn: AsyncConnection) -> list[str]:
    heads = (await conn.execute(sa.select(audit_heads.c.chain))).scalars().all()
    with_rows = (await conn.execute(sa.select(audit_log.c.team_id).distinct())).scalars().all()
    return sorted(set(heads) | {chain_of(t) for t in with_rows})


def _chain_filter(chain: str) -> Any:
    return audit_log.c.team_id.is_(None) if chain == SYSTEM_CHAIN else audit_log.c.team_id == chain


async def _head(conn: AsyncConnection, chain: str) -> Any:
    return (await conn.execute(sa.select(audit_heads).where(audit_heads.c.chain == chain))).first()


async def _broken_link(conn: AsyncConnection, chain: str, row: Any, prev_id: int | None) -> str:
    """Why ``row.prev_hash`` is not the hash of the record walked before it."""
    before = f"record id={prev_id}" if prev_id is not None else "the start of the chain"
    if row.prev_hash == GENESIS:
        return f"claims to start the chain but follows {before} (rows were reordered or inserted)"
    # Only on failure: find the record whose hash it names (a scan is fine here).
    named = await conn.scalar(
        sa.select(audit_log.c.id).where(_chain_filter(chain), audit_log.c.hash == row.prev_hash).limit(1)
    )
    if named is not None and named > row.id:
        return f"out of order: it follows record id={named}, which comes after it (rows were reordered)"
    if named is not None:
        return f"its predecessor is record id={named}, not {before} (rows were reordered)"
    return f"prev_hash does not match {before}: the record that preceded it is missing (deleted) or {before} was altered"


async def _verify_chain(conn: AsyncConnection, chain: str, *, page: int = 2000) -> tuple[int, Mismatch | None]:
    """Walk one chain in pages; returns (records verified, first mismatch).

    Records appended while the walk runs are fine: the walk goes up to the
    head it read, then re-reads the head when it finds rows beyond it.
    """
    head = await _head(conn, chain)
    prev, prev_id, n = GENESIS, None, 0
    while True:
        # 1. walk the rows after the last one checked, up to the head's last id
        while True:
            query = sa.select(audit_log).where(_chain_filter(chain))
            if prev_id is not None:
                query = query.where(audit_log.c.id > prev_id)
            if head is not None:
                query = query.where(audit_log.c.id <= (head.last_id if head.last_id is not None else prev_id or 0))
            rows = (await conn.execute(query.order_by(audit_log.c.id).limit(page))).all()
            for row in rows:
                if row.prev_hash != prev:
                    reason = await _broken_link(conn, chain, row, prev_id)
                    return n, Mismatch(chain=chain, id=row.id, position=n + 1, reason=reason)
                if _row_hash(row) != row.hash:
                    return n, Mismatch(
                        chain=chain, id=row.id, position=n + 1, reason="contents do not match its hash (the record was altered)"
                    )
                prev, prev_id, n = row.hash, row.id, n + 1
            if len(rows) < page:
                break
        if head is None:
            if n == 0:
                return 0, None
            head = await _head(conn, chain)
            if head is None:
                return n, Mismatch(chain=chain, id=None, position=n, reason="the chain's head row is missing")
            continue
        # 2. the chain must end where its head says it does
        if head.count > n or (head.last_id is not None and (prev_id is None or head.last_id > prev_id)):
            return n, Mismatch(
                chain=chain,
                id=head.last_id,
                position=head.count,
                reason=(
                    f"missing: the head says the chain has {head.count} records ending at id={head.last_id}, "
                    f"but it ends at {f'id={prev_id}' if prev_id is not None else 'nothing'} after {n} "
                    f"({head.count - n} newest record(s) deleted)"
                ),
            )
        if head.count != n or head.last_hash != prev or head.last_id != prev_id:
            return n, Mismatch(
                chain=chain,
                id=prev_id,
                position=n,
                reason=(
                    f"does not match the chain's head (head: {head.count} records, last id={head.last_id}; "
                    f"found: {n} records, last id={prev_id}): the head was altered"
                ),
            )
        # 3. rows after the head: appended during the walk, or added outside the log
        beyond = sa.select(sa.func.min(audit_log.c.id)).where(_chain_filter(chain))
        if prev_id is not None:
            beyond = beyond.where(audit_log.c.id > prev_id)
        extra = await conn.scalar(beyond)
        if extra is None:
            return n, None
        newer = await _head(conn, chain)
        if newer is not None and newer.count > head.count:
            head = newer
            continue
        return n, Mismatch(
            chain=chain,
            id=extra,
            position=n + 1,
            reason="not part of the chain: it comes after the chain's head (added without going through the log)",
        )


async def verify(engine: AsyncEngine, team: str | None = None) -> VerifyResult:
    """Walk one team's chain (by name or id; ``system`` for team-less records) or every chain.

    Returns the number of records verified and the first record that does
    not match (``result.mismatch``), if any.
    """
    async with engine.connect() as conn:
        if team is None:
            chains = await _chains(conn)
        elif team == SYSTEM_CHAIN:
            chains = [SYSTEM_CHAIN]
        else:
            tid = await conn.scalar(sa.select(teams.c.id).where(teams.c.name == team))
            chains = [tid or team]
        total = 0
        for chain in chains:
            n, mismatch = await _verify_chain(conn, chain)
            total += n
            if mismatch is not None:
                return VerifyResult(verified=total, chains=len(chains), mismatch=mismatch)
    return VerifyResult(verified=total, chains=len(chains))


async def list_records(
    engine: AsyncEngine,
    *,
    team_id: str | None,
    action: str | None = None,
    since: int | None = None,
    room_id: str | None = None,
    after_id: int | None = None,
    before_id: int | None = None,
    newest_first: bool = False,
    limit: int = 100,
) -> list[AuditRecord]:
    """A team's records (``team_id`` None: the system chain), filtered, by id."""
    query = sa.select(audit_log).where(_chain_filter(chain_of(team_id)))
    if action:
        query = query.where(audit_log.c.action == action) if not action.endswith(".") else query.where(
            audit_log.c.action.startswith(action)
        )
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    if room_id:
        query = query.where(audit_log.c.room_id == room_id)
    if after_id is not None:
        query = query.where(audit_log.c.id > after_id)
    if before_id is not None:
        query = query.where(audit_log.c.id < before_id)
    order = audit_log.c.id.desc() if newest_first else audit_log.c.id
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(order).limit(limit))).all()
    return [to_record(r) for r in rows]


async def export(
    engine: AsyncEngine, *, since: int | None = None, team: str | None = None, page: int = 1000
) -> AsyncIterator[AuditRecord]:
    """Every record created at or after ``since`` (epoch ms), oldest first."""
    query = sa.select(audit_log)
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    if team is not None:
        tid = SYSTEM_CHAIN if team == SYSTEM_CHAIN else (await team_id_for(engine, team)) or team
        query = query.where(_chain_filter(tid))
    last = 0
    while True:
        async with engine.connect() as conn:
            rows = (await conn.execute(query.where(audit_log.c.id > last).order_by(audit_log.c.id).limit(page))).all()
        for row in rows:
            yield to_record(row)
        if len(rows) < page:
            return
        last = rows[-1].id


def encode_jsonl(records: Iterable[AuditRecord]) -> bytes:
    """Records as JSON lines."""
    enc = msgspec.json.Encoder()
    return b"".join(enc.encode(r) + b"\n" for r in records)
