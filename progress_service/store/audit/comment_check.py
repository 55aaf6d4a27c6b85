"""Comments checked against their ``comment.create`` records.

A comment row and its audit record are written in one transaction; the
record holds the text, its SHA-256, the author, the room and the time, and
is keyed, so it cannot be changed without the audit key. Editing the
``comments`` table alone is therefore visible: the row no longer matches its
record. ``audit verify`` compares every comment; the comments read path
(``store/comments.py``) compares each page it serves and marks a comment
that does not match ``tampered`` (serving the record's original text when
the record itself verifies).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from progress_service.store.audit.append import chain_filter
from progress_service.store.audit.chain import SYSTEM_CHAIN, row_hash
from progress_service.store.audit.keys import Keyring
from progress_service.store.audit.report import Mismatch
from progress_service.store.schema import audit_log, comments

COMMENT_ACTION = "comment.create"


@dataclass(frozen=True, slots=True)
class Claim:
    """What a ``comment.create`` record says about its comment."""

    record_id: int
    text_sha256: str
    text: str | None
    user_id: str | None
    user_name: str | None
    room_id: str | None
    created_at: int


def claim_of(row: Any, detail: dict[str, Any] | None = None) -> tuple[int, Claim] | None:
    """``(comment id, claim)`` of a ``comment.create`` record row; None when it names no comment."""
    if detail is None:
        try:
            detail = msgspec.json.decode(row.detail)
        except msgspec.DecodeError:
            return None
    if not isinstance(detail, dict) or not isinstance(detail.get("commentId"), int):
        return None
    text = detail.get("text")
    sha = detail.get("textSha256") or (hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str) else "")
    return detail["commentId"], Claim(
        record_id=row.id,
        text_sha256=str(sha),
        text=text if isinstance(text, str) else None,
        user_id=detail.get("userId"),
        user_name=row.actor,
        room_id=row.room_id,
        created_at=row.created_at,
    )


def differences(comment: Any, claim: Claim) -> list[str]:
    """What of a comment row differs from its record (empty: it matches)."""
    out: list[str] = []
    if hashlib.sha256(comment.text.encode()).hexdigest() != claim.text_sha256:
        out.append("text")
    if claim.user_id is not None and comment.user_id != claim.user_id:
        out.append("author id")
    if comment.user_name != claim.user_name:
        out.append("author")
    if comment.room_id != claim.room_id:
        out.append("room")
    if comment.created_at != claim.created_at:
        out.append("time")
    return out


_RECORDS_OF_ROOM = sa.select(audit_log).where(
    audit_log.c.room_id == sa.bindparam("b_room"),
    audit_log.c.action == COMMENT_ACTION,
    audit_log.c.created_at >= sa.bindparam("b_from"),
    audit_log.c.created_at <= sa.bindparam("b_to"),
)


async def tampered(conn: AsyncConnection, room_id: str, rows: Sequence[Any], keys: Keyring) -> dict[int, str]:
    """Comments of one room's page that do not match a valid record: comment id → text to serve.

    The text to serve is the record's original when the record's own hash
    verifies, else ``""`` (nothing trustworthy to show).
    """
    if not rows:
        return {}
    times = [r.created_at for r in rows]
    records = (
        await conn.execute(_RECORDS_OF_ROOM, {"b_room": room_id, "b_from": min(times), "b_to": max(times)})
    ).all()
    claims: dict[int, tuple[Claim, bool]] = {}
    for rec in records:
        found = claim_of(rec)
        if found is None:
            continue
        secret = keys.secret(rec.key_id)
        valid = (rec.key_id is None or secret is not None) and row_hash(rec, secret) == rec.hash
        # A valid record wins over a forged one claiming the same comment.
        if found[0] not in claims or (valid and not claims[found[0]][1]):
            claims[found[0]] = (found[1], valid)
    out: dict[int, str] = {}
    for row in rows:
        have = claims.get(row.id)
        if have is None:
            out[row.id] = ""
            continue
        claim, valid = have
        if not valid:
            out[row.id] = ""
        elif differences(row, claim):
            out[row.id] = claim.text if claim.text is not None else ""
    return out


async def check_comments(
    conn: AsyncConnection, chain: str, claims: dict[int, Claim], walked_to: int | None
) -> tuple[int, list[Mismatch]]:
    """Compare a team's comments with the ``comment.create`` records a walk of its chain collected.

    ``walked_to`` is the last record id the walk checked: a comment whose
    record is newer was stored while verify ran, and is not a problem.
    """
    if chain == SYSTEM_CHAIN:
        return 0, []
    problems: list[Mismatch] = []
    seen: set[int] = set()
    checked, last = 0, 0
    while True:
        rows = (
            await conn.execute(
                sa.select(comments.c.id, comments.c.room_id, comments.c.user_id, comments.c.user_name, comments.c.text, comments.c.created_at)
                .where(comments.c.team_id == chain, comments.c.id > last)
                .order_by(comments.c.id)
                .limit(5000)
            )
        ).all()
        for row in rows:
            checked += 1
            claim = claims.get(row.id)
            if claim is None:
                if await _recorded_after_walk(conn, chain, walked_to, row):
                    continue  # stored while verify ran: its record is newer than the walk
                problems.append(
                    Mismatch(
                        chain=chain, id=None, position=0, subject=f"comment id={row.id}",
                        reason="has no comment.create record (stored without going through the log)",
                    )
                )
                continue
            seen.add(row.id)
            diff = differences(row, claim)
            if diff:
                problems.append(
                    Mismatch(
                        chain=chain, id=claim.record_id, position=0,
                        subject=f"comment id={row.id} (record id={claim.record_id})",
                        reason=f"differs from its comment.create record: {', '.join(diff)} changed in the comments table",
                    )
                )
        if len(rows) < 5000:
            break
        last = rows[-1].id
    for comment_id in sorted(set(claims) - seen):
        claim = claims[comment_id]
        problems.append(
            Mismatch(
                chain=chain, id=claim.record_id, position=0, subject=f"comment id={comment_id} (record id={claim.record_id})",
                reason="is missing from the comments table (deleted)",
            )
        )
    return checked, problems


async def _recorded_after_walk(conn: AsyncConnection, chain: str, walked_to: int | None, row: Any) -> bool:
    """True when the comment's record was appended after the walk passed (a live append)."""
    query = sa.select(audit_log.c.id, audit_log.c.detail).where(
        audit_log.c.room_id == row.room_id,
        audit_log.c.created_at == row.created_at,
        audit_log.c.action == COMMENT_ACTION,
        chain_filter(chain),
    )
    if walked_to is not None:
        query = query.where(audit_log.c.id > walked_to)
    for rec in (await conn.execute(query)).all():
        try:
            detail = msgspec.json.decode(rec.detail)
        except msgspec.DecodeError:
            continue
        if isinstance(detail, dict) and detail.get("commentId") == row.id:
            return True
    return False
