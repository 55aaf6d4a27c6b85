"""The audit writer task: queued security events, and checkpoints to the witness.

Security events are written through :class:`Audit`: ``record_nowait`` only
puts the record on a bounded queue (never blocking the caller, such as the
gateway's fan-out path) and :meth:`Audit.run` appends queued records in
batches. When the queue is full a record is dropped and counted
(``ps_audit_dropped_total``). Comments never go through that queue: their
audit record is written in the comment's own transaction (see
``store/comments.py``).

:meth:`Audit.run` also runs the :class:`Checkpointer` in its own task group,
so checkpoints live exactly as long as the writer: one at start, one every
``PS_AUDIT_CHECKPOINT_SECONDS`` while any chain's head moves (whoever
appended: this writer, the comment writer, another node, the CLI) and one
after the last queued record is written at shutdown.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service import metrics, outage
from progress_service.ids import now_ms
from progress_service.settings import Settings
from progress_service.store.audit import keys as audit_keys
from progress_service.store.audit.append import append
from progress_service.store.audit.chain import Entry, canonical_json, scrub
from progress_service.store.audit.witness import Checkpoint, FileWitness, RedisWitness, open_witness
from progress_service.store.schema import audit_heads

log = logging.getLogger("progress_service.audit")

audit_dropped = Counter(
    "ps_audit_dropped_total", "Security audit records dropped because the queue was full", registry=metrics.registry
)
audit_queue = Gauge("ps_audit_queue", "Security audit records waiting to be written", registry=metrics.registry)
audit_checkpoints = Counter(
    "ps_audit_checkpoints_total", "Chain checkpoints appended to the audit witness", registry=metrics.registry
)
audit_tamper = Counter(
    "ps_audit_head_regressions_total",
    "Chain heads found moved backwards by the checkpointer (tampering with the store)",
    registry=metrics.registry,
)


async def read_heads(engine: AsyncEngine) -> list[Checkpoint]:
    """Every chain's head as an unsigned checkpoint taken now."""
    at = now_ms()
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_heads).order_by(audit_heads.c.chain))).all()
    return [
        Checkpoint(chain=r.chain, count=int(r._mapping["count"]), lastId=r.last_id, lastHash=r.last_hash, at=at)
        for r in rows
        if int(r._mapping["count"]) > 0
    ]


class Checkpointer:
    """Appends signed checkpoints of every chain whose head moved to the witness."""

    def __init__(
        self, engine: AsyncEngine, witness: FileWitness | RedisWitness, keys: audit_keys.Keyring, *, interval: float
    ) -> None:
        self.engine = engine
        self.witness = witness
        self.keys = keys
        self.interval = interval
        #: Per chain, the last state this process checkpointed.
        self._last: dict[str, Checkpoint] = {}
        self.written = 0

    async def checkpoint(self, *, every: bool = False) -> int:
        """Append checkpoints of the chains that moved (``every``: of all); returns how many."""
        fresh: list[Checkpoint] = []
        for cp in await read_heads(self.engine):
            before = self._last.get(cp.chain)
            if before is not None and (cp.count < before.count or (cp.count == before.count and cp.lastHash != before.lastHash)):
                # The head moved backwards since we signed it: never sign the
                # shorter chain (verify names what is missing).
                audit_tamper.inc()
                log.error(
                    "audit: chain %s moved backwards: checkpointed %s, now %d record(s) ending at id=%s; not checkpointed",
                    cp.chain, before.describe(), cp.count, cp.lastId,
                )
                continue
            if every or before is None or before.count != cp.count:
                fresh.append(cp.signed(self.keys))
        if fresh:
            await anyio.to_thread.run_sync(self.witness.append, fresh)
            for cp in fresh:
                self._last[cp.chain] = cp
            self.written += len(fresh)
            audit_checkpoints.inc(len(fresh))
        return len(fresh)

    async def run(self) -> None:
        """Checkpoint at start and every ``interval`` seconds until cancelled.

        It starts from the witness's latest checkpoint of each chain, so a
        restarted node never signs a chain that got shorter meanwhile.
        """
        try:
            contents = await anyio.to_thread.run_sync(self.witness.read, self.keys)
            self._last = {chain: cp for chain, (_, cp) in contents.latest().items()}
        except Exception:  # an unreadable witness must not stop the checkpoints
            log.exception("audit: could not read the witness %s", self.witness.name)
        first = True
        while True:
            try:
                await self.checkpoint(every=first)
                first = False
            except Exception:  # store or disk trouble: try again next round
                log.exception("audit: checkpoint failed")
            await anyio.sleep(self.interval)


def checkpointer_for(engine: AsyncEngine, settings: Settings, keys: audit_keys.Keyring) -> Checkpointer | None:
    """The checkpointer the settings ask for (None when ``PS_AUDIT_WITNESS=off``)."""
    witness = open_witness(settings)
    if witness is None:
        return None
    return Checkpointer(engine, witness, keys, interval=settings.audit_checkpoint_seconds)


#: Errors that retrying the same batch cannot cure.
_PERMANENT = (sa.exc.DataError, sa.exc.IntegrityError, sa.exc.ProgrammingError, TypeError, ValueError)


class Audit:
    """Security events, recorded without making the caller wait for the store.

    ``record`` enqueues (bounded); :meth:`run` — a task of the app's
    lifespan — appends what is queued in batches, retrying while the store
    is down. A full queue drops the new record and counts it. With a
    ``checkpointer``, :meth:`run` also checkpoints the chains to the witness.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        maxsize: int = 10_000,
        batch: int = 200,
        keys: audit_keys.Keyring | None = None,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.checkpointer = checkpointer
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

    @classmethod
    def from_settings(cls, engine: AsyncEngine, settings: Settings) -> Audit:
        """The app's writer: the key file (created when missing, bound to the
        engine, so comment records use it too) and the witness."""
        keys = audit_keys.load_or_create(audit_keys.key_file_path(settings))
        audit_keys.bind(engine, keys)
        return cls(engine, keys=keys, checkpointer=checkpointer_for(engine, settings, keys))

    @property
    def pending(self) -> int:
        """Records queued or being written."""
        return self._pending

    async def run(self) -> None:
        """Write queued records (and checkpoint) until cancelled.

        On the way out it writes what is still queued, then a checkpoint of
        every chain.
        """
        try:
            async with anyio.create_task_group() as tg:
                if self.checkpointer is not None:
                    tg.start_soon(self.checkpointer.run)
                await self._write_queued()
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
                if self.checkpointer is not None:
                    try:
                        await self.checkpointer.checkpoint(every=True)
                    except Exception as exc:
                        if (dependency := outage.classify(exc)) is None:
                            log.exception("audit: the shutdown checkpoint failed")
                        else:  # the store or Redis is down: one line, not a traceback
                            outage.warn(dependency, "the audit shutdown checkpoint", exc)

    async def _write_queued(self) -> None:
        while True:
            first = await self._recv.receive()
            batch = [first]
            while len(batch) < self.batch:
                try:
                    batch.append(self._recv.receive_nowait())
                except anyio.WouldBlock:
                    break
            await self._write(batch)

    async def _write(self, batch: list[Entry], *, retry: bool = True) -> None:
        delay = 0.2
        while True:
            try:
                async with self.engine.begin() as conn:
                    await append(conn, batch, keys=self.keys)
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
                    await append(conn, [entry], keys=self.keys)
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
