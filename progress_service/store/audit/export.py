"""Reading records out: the admin API's list, ``audit export``, and verifying an export offline.

An export is JSON lines: the records, oldest first, then one
``{"checkpoint": {…}}`` line per exported chain with the witness's latest
signed checkpoint of that chain. :func:`verify_export` checks such a file
without the store: the links and keyed hashes of the records (with the key
file), and that every checkpoint's signature verifies and the record it
pins is in the export with the hash it pins, so an export whose newest
records were cut off, or that was rewritten, does not verify.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.store.audit.append import chain_filter, team_id_for
from progress_service.store.audit.chain import GENESIS, SYSTEM_CHAIN, AuditRecord, canonical_json, chain_of, to_record
from progress_service.store.audit.keys import Keyring
from progress_service.store.audit.report import Mismatch, VerifyResult
from progress_service.store.audit.verify import _Walk
from progress_service.store.audit.witness import Checkpoint, WitnessContents, parse_lines
from progress_service.store.schema import audit_log


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
    query = sa.select(audit_log).where(chain_filter(chain_of(team_id)))
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


async def export_chain_ids(engine: AsyncEngine, team: str | None) -> str | None:
    """The chain ``--team`` names (None: every chain)."""
    if team is None:
        return None
    return SYSTEM_CHAIN if team == SYSTEM_CHAIN else (await team_id_for(engine, team)) or team


async def export(
    engine: AsyncEngine, *, since: int | None = None, team: str | None = None, page: int = 1000
) -> AsyncIterator[AuditRecord]:
    """Every record created at or after ``since`` (epoch ms), oldest first."""
    query = sa.select(audit_log)
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    chain = await export_chain_ids(engine, team)
    if chain is not None:
        query = query.where(chain_filter(chain))
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


class CheckpointLine(msgspec.Struct):
    """A checkpoint line of an export."""

    checkpoint: Checkpoint


def checkpoint_lines(witness: WitnessContents, chains: Iterable[str]) -> bytes:
    """The export's checkpoint lines: the latest checkpoint of each of ``chains``."""
    latest = witness.latest()
    return b"".join(msgspec.json.encode(CheckpointLine(latest[c][1])) + b"\n" for c in sorted(set(chains)) if c in latest)


def _as_row(rec: AuditRecord) -> Any:
    return SimpleNamespace(
        id=rec.id,
        team_id=rec.teamId,
        actor=rec.actor,
        action=rec.action,
        room_id=rec.roomId,
        detail=canonical_json(rec.detail),
        created_at=rec.createdAt,
        prev_hash=rec.prevHash,
        hash=rec.hash,
        key_id=rec.keyId,
    )


def verify_export(data: bytes, keys: Keyring) -> VerifyResult:
    """Verify an ``audit export`` file offline with the key file's keys."""
    result = VerifyResult(verified=0, chains=0)
    by_chain: dict[str, list[AuditRecord]] = {}
    cp_lines: list[bytes] = []
    decoder = msgspec.json.Decoder(AuditRecord)
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if raw.startswith(b'{"checkpoint"'):
            cp_lines.append(msgspec.json.encode(msgspec.json.decode(raw, type=CheckpointLine).checkpoint))
            continue
        try:
            rec = decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            result.problems.append(Mismatch(chain="export", id=None, position=number, subject=f"export line {number}", reason=f"not a record: {exc}"))
            continue
        by_chain.setdefault(rec.chain, []).append(rec)
    witness = parse_lines(cp_lines, keys, source="(export)")
    for line, reason in witness.bad:
        result.problems.append(Mismatch(chain="export", id=None, position=line, subject=f"checkpoint {line} of the export", reason=reason))
    latest = {chain: cp for chain, (_, cp) in witness.latest().items()}
    result.chains = len(set(by_chain) | set(latest))
    for chain in sorted(set(by_chain) | set(latest)):
        records = sorted(by_chain.get(chain, []), key=lambda r: r.id)
        cp = latest.get(chain)
        whole = not records or records[0].prevHash == GENESIS
        w = _Walk(chain=chain, keys=keys, checkpoint=cp if whole else None)
        if records:
            w.prev = records[0].prevHash  # an export --since starts mid-chain
        mismatch = _walk_export(w, records)
        result.verified += w.n
        result.legacy += w.legacy
        if mismatch is None and cp is not None:
            result.checkpointed += 1
            mismatch = _against_checkpoint(w, records, cp, whole)
        if mismatch is not None:
            result.problems.append(mismatch)
    if not latest:
        result.notes.append("the export holds no checkpoints: its newest records are not pinned")
    return result


def _walk_export(w: _Walk, records: list[AuditRecord]) -> Mismatch | None:
    for rec in records:
        row = _as_row(rec)
        if row.prev_hash != w.prev:
            before = f"record id={w.prev_id}" if w.prev_id is not None else "the start of the export"
            return Mismatch(chain=w.chain, id=rec.id, position=w.n + 1, reason=f"prev_hash does not match {before}: a record is missing or was altered")
        reason = w.check(row)
        if reason is not None:
            return Mismatch(chain=w.chain, id=rec.id, position=w.n + 1, reason=reason)
        reason = w.advance(row)
        if reason is not None:
            return Mismatch(chain=w.chain, id=rec.id, position=w.n, reason=reason)
    return None


def _against_checkpoint(w: _Walk, records: list[AuditRecord], cp: Checkpoint, whole: bool) -> Mismatch | None:
    pinned = next((r for r in records if r.id == cp.lastId), None)
    if pinned is not None:
        if pinned.hash != cp.lastHash:
            return Mismatch(chain=w.chain, id=pinned.id, position=0, reason=f"is not the record the checkpoint pins ({cp.describe()})")
        return None
    if records and cp.lastId is not None and records[0].id > cp.lastId:
        return None  # the export starts after the checkpointed record (--since)
    return Mismatch(
        chain=w.chain,
        id=None,
        position=w.n + 1,
        subject=f"missing record #{w.n + 1}" if whole else "missing records",
        reason=f"the checkpoint says the chain had {cp.describe()}, but the export ends at "
        f"{f'id={w.prev_id}' if w.prev_id is not None else 'nothing'}",
    )
