"""Verifying the chains in the store: links, keyed hashes, heads, checkpoints, comments.

For each chain ``verify`` walks the records by id and checks that each
``prev_hash`` is its predecessor's hash and that each hash is right: HMAC
under the record's key (an unknown key id is named), or SHA-256 for a legacy
record written before keys (a legacy record after a keyed one is forged).
The chain must end where its head row says. Then the latest checkpoint of
the chain in the witness: the record at the checkpoint's position must be the
one it names, and a chain shorter than its checkpoint, or one that vanished,
is named with its first missing record. Finally every comment of the team is
compared with its ``comment.create`` record.

Records appended while the walk runs are fine: the walk goes up to the head
it read, then re-reads the head when it finds rows beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from progress_service.store.audit.append import chain_filter
from progress_service.store.audit.chain import GENESIS, SYSTEM_CHAIN, chain_of, keyed_hash, row_hash
from progress_service.store.audit.comment_check import COMMENT_ACTION, Claim, check_comments, claim_of
from progress_service.store.audit.keys import Keyring
from progress_service.store.audit.report import MAX_COMMENT_PROBLEMS, Mismatch, VerifyResult
from progress_service.store.audit.witness import Checkpoint, WitnessContents
from progress_service.store.schema import audit_heads, audit_log, teams

_ALTERED = "contents do not match its hash (the record was altered or forged without the key)"



async def _chains(conn: AsyncConnection) -> list[str]:
    heads = (await conn.execute(sa.select(audit_heads.c.chain))).scalars().all()
    with_rows = (await conn.execute(sa.select(audit_log.c.team_id).distinct())).scalars().all()
    return sorted(set(heads) | {chain_of(t) for t in with_rows})


async def _head(conn: AsyncConnection, chain: str) -> Any:
    return (await conn.execute(sa.select(audit_heads).where(audit_heads.c.chain == chain))).first()


async def _broken_link(conn: AsyncConnection, chain: str, row: Any, prev_id: int | None) -> str:
    """Why ``row.prev_hash`` is not the hash of the record walked before it."""
    before = f"record id={prev_id}" if prev_id is not None else "the start of the chain"
    if row.prev_hash == GENESIS:
        return f"claims to start the chain but follows {before} (rows were reordered or inserted)"
    # Only on failure: find the record whose hash it names (a scan is fine here).
    named = await conn.scalar(
        sa.select(audit_log.c.id).where(chain_filter(chain), audit_log.c.hash == row.prev_hash).limit(1)
    )
    if named is not None and named > row.id:
        return f"out of order: it follows record id={named}, which comes after it (rows were reordered)"
    if named is not None:
        return f"its predecessor is record id={named}, not {before} (rows were reordered)"
    return f"prev_hash does not match {before}: the record that preceded it is missing (deleted) or {before} was altered"


@dataclass
class _Walk:
    """Where a chain walk is: last hash and id, records seen, what it collected."""

    chain: str
    keys: Keyring
    checkpoint: Checkpoint | None = None
    prev: str = GENESIS
    prev_id: int | None = None
    n: int = 0
    keyed: bool = False
    legacy: int = 0
    claims: dict[int, Claim] = field(default_factory=dict)

    def check(self, row: Any) -> str | None:
        """Why ``row`` (the next record by id) is wrong, apart from its link; None when right."""
        if row.key_id is None:
            if self.keyed:
                return "an unkeyed (SHA-256) record after keyed ones: written without the audit key (forged)"
            first = self.keys.first_key_at
            if first is not None and row.created_at > first:
                return "an unkeyed (SHA-256) record dated after the audit key existed: written without the key (forged)"
            secret = None
        else:
            secret = self.keys.secret(row.key_id)
            if secret is None:
                return f"keyed with unknown key id {row.key_id!r} (not in the key file)"
        if row_hash(row, secret) != row.hash:
            return _ALTERED
        return None

    def advance(self, row: Any) -> str | None:
        """Accept ``row``; the reason it contradicts the checkpoint, if it does."""
        if row.key_id is None:
            self.legacy += 1
        else:
            self.keyed = True
        if row.action == COMMENT_ACTION:
            found = claim_of(row)
            if found is not None:
                self.claims[found[0]] = found[1]
        self.prev, self.prev_id, self.n = row.hash, row.id, self.n + 1
        cp = self.checkpoint
        if cp is not None and self.n == cp.count and (row.id != cp.lastId or row.hash != cp.lastHash):
            return (
                f"is not the record the witness pinned at #{cp.count} (id={cp.lastId}, hash {cp.lastHash[:12]}…; "
                f"{cp.describe()}): the chain was rewritten"
            )
        return None


_COLUMNS = [
    audit_log.c.id,
    audit_log.c.team_id,
    audit_log.c.actor,
    audit_log.c.action,
    audit_log.c.room_id,
    audit_log.c.detail,
    audit_log.c.created_at,
    audit_log.c.prev_hash,
    audit_log.c.hash,
    audit_log.c.key_id,
]


async def _walk_rows(conn: AsyncConnection, w: _Walk, up_to: int | None, page: int) -> Mismatch | None:
    """Check the chain's rows after ``w.prev_id`` up to id ``up_to`` (None: all)."""
    while True:
        query = sa.select(*_COLUMNS).where(chain_filter(w.chain))
        if w.prev_id is not None:
            query = query.where(audit_log.c.id > w.prev_id)
        if up_to is not None:
            query = query.where(audit_log.c.id <= up_to)
        rows = (await conn.execute(query.order_by(audit_log.c.id).limit(page))).all()
        mismatch = await _check_page(conn, w, rows)
        if mismatch is not None:
            return mismatch
        if len(rows) < page:
            return None


async def _check_page(conn: AsyncConnection, w: _Walk, rows: Any) -> Mismatch | None:
    """Check one page of rows (in id order) after ``w``'s position.

    The common record (keyed with a known key, not a comment, not where the
    checkpoint pins) takes the inlined fast path, which is most of what
    verifying a million records costs; everything else goes through
    :meth:`_Walk.check` / :meth:`_Walk.advance`.
    """
    secrets = w.keys.secrets
    pinned = w.checkpoint.count if w.checkpoint is not None else -1
    for row in rows:
        rid, team, actor, action, room, detail, at, prev_hash, digest, kid = row
        if prev_hash != w.prev:
            reason = await _broken_link(conn, w.chain, row, w.prev_id)
            return Mismatch(chain=w.chain, id=rid, position=w.n + 1, reason=reason)
        secret = secrets.get(kid) if kid is not None else None
        if secret is not None and action != COMMENT_ACTION and w.n + 1 != pinned:
            if keyed_hash(secret, kid, prev_hash, team, actor, action, room, detail, at) != digest:
                return Mismatch(chain=w.chain, id=rid, position=w.n + 1, reason=_ALTERED)
            w.keyed = True
            w.prev, w.prev_id, w.n = digest, rid, w.n + 1
            continue
        problem = w.check(row) or w.advance(row)
        if problem is not None:
            return Mismatch(chain=w.chain, id=rid, position=w.n if rid == w.prev_id else w.n + 1, reason=problem)
    return None


async def _verify_chain(conn: AsyncConnection, w: _Walk, *, page: int = 5000) -> Mismatch | None:
    """Walk one chain in pages; the first mismatch, or None (``w`` holds the counts)."""
    chain = w.chain
    head = await _head(conn, chain)
    while True:
        # 1. walk the rows after the last one checked, up to the head's last id
        up_to = None if head is None else (head.last_id if head.last_id is not None else w.prev_id or 0)
        mismatch = await _walk_rows(conn, w, up_to, page)
        if mismatch is not None:
            return mismatch
        if head is None:
            if w.n == 0:
                return None
            head = await _head(conn, chain)
            if head is None:
                return Mismatch(chain=chain, id=None, position=w.n, reason="the chain's head row is missing")
            continue
        # 2. the chain must end where its head says it does
        n, prev_id = w.n, w.prev_id
        if head.count > n or (head.last_id is not None and (prev_id is None or head.last_id > prev_id)):
            return Mismatch(
                chain=chain,
                id=head.last_id,
                position=head.count,
                reason=(
                    f"missing: the head says the chain has {head.count} records ending at id={head.last_id}, "
                    f"but it ends at {f'id={prev_id}' if prev_id is not None else 'nothing'} after {n} "
                    f"({head.count - n} newest record(s) deleted)"
                ),
            )
        if head.count != n or head.last_hash != w.prev or head.last_id != prev_id:
            return Mismatch(
                chain=chain,
                id=prev_id,
                position=n,
                reason=(
                    f"does not match the chain's head (head: {head.count} records, last id={head.last_id}; "
                    f"found: {n} records, last id={prev_id}): the head was altered"
                ),
            )
        # 3. rows after the head: appended during the walk, or added outside the log
        beyond = sa.select(sa.func.min(audit_log.c.id)).where(chain_filter(chain))
        if prev_id is not None:
            beyond = beyond.where(audit_log.c.id > prev_id)
        extra = await conn.scalar(beyond)
        if extra is None:
            return None
        newer = await _head(conn, chain)
        if newer is not None and newer.count > head.count:
            head = newer
            continue
        return Mismatch(
            chain=chain,
            id=extra,
            position=n + 1,
            reason="not part of the chain: it comes after the chain's head (added without going through the log)",
        )


def short_of_checkpoint(w: _Walk) -> Mismatch | None:
    """The chain ended before the record its checkpoint pins (newest records deleted)."""
    cp = w.checkpoint
    if cp is None or w.n >= cp.count:
        return None
    if w.n == 0:
        return Mismatch(
            chain=w.chain, id=None, position=1, subject="missing record #1",
            reason=f"the chain vanished (its records and its head are gone); the witness says it had {cp.describe()}",
        )
    where = f"id={w.prev_id}"
    return Mismatch(
        chain=w.chain,
        id=None,
        position=w.n + 1,
        subject=f"missing record #{w.n + 1} (the one after id={w.prev_id})",
        reason=(
            f"the witness says the chain had {cp.describe()}, but it ends at {where} after {w.n}: "
            f"{cp.count - w.n} record(s) deleted and the head moved back"
        ),
    )


async def verify(
    engine: AsyncEngine,
    team: str | None = None,
    *,
    keys: Keyring | None = None,
    witness: WitnessContents | None = None,
    page: int = 5000,
) -> VerifyResult:
    """Verify one team's chain (by name or id; ``system`` for team-less records) or every chain.

    ``keys`` default to the engine's keyring; ``witness`` holds the
    checkpoints to check against (None: none). Returns everything wrong, the
    first wrong record of each chain first.
    """
    from progress_service.store.audit import keys as audit_keys  # noqa: PLC0415

    ring = keys if keys is not None else audit_keys.for_verify(None, engine)[0]
    latest = witness.latest() if witness is not None else {}
    result = VerifyResult(verified=0, chains=0)
    async with engine.connect() as conn:
        if team is None:
            chains = sorted(set(await _chains(conn)) | set(latest))
        elif team == SYSTEM_CHAIN:
            chains = [SYSTEM_CHAIN]
        else:
            tid = await conn.scalar(sa.select(teams.c.id).where(teams.c.name == team))
            chains = [tid or team]
        result.chains = len(chains)
        for chain in chains:
            cp = latest.get(chain, (0, None))[1]
            w = _Walk(chain=chain, keys=ring, checkpoint=cp)
            mismatch = await _verify_chain(conn, w, page=page)
            result.verified += w.n
            result.legacy += w.legacy
            result.checkpointed += cp is not None
            if mismatch is not None:
                result.problems.append(mismatch)
                continue  # the walk stopped early: comments are compared on fully walked chains only
            short = short_of_checkpoint(w)
            if short is not None:
                result.problems.append(short)
            checked, comment_problems = await check_comments(conn, w.chain, w.claims, w.prev_id)
            result.comments += checked
            result.problems.extend(comment_problems[:MAX_COMMENT_PROBLEMS])
            if len(comment_problems) > MAX_COMMENT_PROBLEMS:
                result.notes.append(
                    f"chain {chain}: {len(comment_problems) - MAX_COMMENT_PROBLEMS} more comment problem(s) not listed"
                )
    if witness is not None:
        add_witness_findings(result, witness, set(chains))
    return result


def add_witness_findings(result: VerifyResult, witness: WitnessContents, chains: set[str]) -> None:
    """Bad checkpoints, heads that moved backwards and torn lines, into ``result``."""
    for line, reason in witness.bad:
        result.problems.append(
            Mismatch(chain="witness", id=None, position=line, subject=f"witness {witness.source} line {line}", reason=reason)
        )
    for line, before, after in witness.backwards():
        if after.chain in chains:
            result.problems.append(
                Mismatch(
                    chain=after.chain, id=after.lastId, position=after.count, subject=f"witness {witness.source} line {line}",
                    reason=f"the chain's head moved backwards between checkpoints: {before.describe()}, later {after.describe()}",
                )
            )
    if witness.torn:
        lines = ", ".join(str(n) for n in witness.torn)
        result.notes.append(f"witness {witness.source}: ignored torn line(s) {lines} (a crash mid-write)")
