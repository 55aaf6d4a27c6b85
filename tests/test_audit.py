"""The audit log: hash chain, tamper detection, concurrency, CLI, the non-blocking writer.

Every test that takes ``engine`` or ``db_url`` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from progress_service.store import audit
from progress_service.store.audit import keys as audit_keys
from progress_service.store.db import create_engine
from progress_service.store.identity import create_token, ensure_team
from progress_service.store.migrations import migrate
from progress_service.store.schema import audit_heads, audit_log

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, db_url: str, extra: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PS_DATABASE_URL"] = db_url
    # The key (and witness) the in-process appends of the tests use.
    env["PS_AUDIT_KEY_FILE"] = os.environ["PS_AUDIT_KEY_FILE"]
    env["PS_AUDIT_WITNESS"] = "off"
    env.update(extra or {})
    return subprocess.run(
        [sys.executable, "-m", "progress_service.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


async def _fill(engine: Any, team_id: str, n: int, *, action: str = "test.event") -> list[audit.AuditRecord]:
    out = []
    for i in range(n):
        out.append(await audit.record(engine, action=action, team_id=team_id, actor=f"user{i % 3}", room_id="job:abc", detail={"i": i}))
    return out


async def _rows(engine: Any, team_id: str) -> list[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(audit_log).where(audit_log.c.team_id == team_id).order_by(audit_log.c.id))).all()


# --------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------


async def test_records_chain_per_team_and_verify(engine: Any) -> None:
    t1 = await ensure_team(engine, "alpha")
    t2 = await ensure_team(engine, "beta")
    a = await _fill(engine, t1, 5)
    b = await _fill(engine, t2, 3)
    sys_rec = await audit.record(engine, action="auth.failed", team_id=None, detail={"reason": "unknown token"})

    assert a[0].prevHash == audit.GENESIS and b[0].prevHash == audit.GENESIS
    assert all(x.prevHash == y.hash for x, y in zip(a[1:], a[:-1], strict=True))
    assert sys_rec.chain == audit.SYSTEM_CHAIN

    result = await audit.verify(engine)
    assert result.ok, result.mismatch
    assert (result.verified, result.chains) == (9, 3)
    only = await audit.verify(engine, "alpha")
    assert only.ok and only.verified == 5
    assert (await audit.verify(engine, audit.SYSTEM_CHAIN)).verified == 1


async def test_secrets_never_reach_the_log(engine: Any) -> None:
    token, _ = await create_token(engine, user="u", team="t", role="admin")
    rec = await audit.record(
        engine, action="auth.failed", team_id=None, detail={"reason": "bad", "token": token, "x": {"ticket": "pst_abc"}, "y": token}
    )
    async with engine.connect() as conn:
        stored = await conn.scalar(sa.select(audit_log.c.detail).where(audit_log.c.id == rec.id))
    assert token not in stored and "pst_abc" not in stored
    assert json.loads(stored)["reason"] == "bad"


async def test_an_altered_record_is_named(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 6)
    victim = recs[3]
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == victim.id).values(actor="mallory"))
    result = await audit.verify(engine)
    assert not result.ok
    assert result.mismatch.id == victim.id
    assert "altered" in result.mismatch.reason
    assert result.verified == 3


async def test_an_altered_record_with_a_recomputed_sha256_is_named_itself(engine: Any) -> None:
    # Before keyed records this broke only the next link; now the record's
    # own hash is an HMAC nobody without the key can recompute.
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 5)
    victim = recs[2]
    rows = {r.id: r for r in await _rows(engine, tid)}
    row = rows[victim.id]
    forged = audit.compute_hash(
        prev_hash=row.prev_hash, team_id=row.team_id, actor="mallory", action=row.action, room_id=row.room_id,
        detail=row.detail, created_at=row.created_at, key_id=row.key_id, secret=b"guessed" * 5,
    )
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == victim.id).values(actor="mallory", hash=forged))
    result = await audit.verify(engine)
    assert not result.ok
    assert result.mismatch.id == victim.id
    assert "forged without the key" in result.mismatch.reason


async def test_a_deleted_record_is_detected_and_its_successor_named(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 6)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id == recs[2].id))
    result = await audit.verify(engine)
    assert not result.ok
    assert result.mismatch.id == recs[3].id
    assert "deleted" in result.mismatch.reason and f"id={recs[1].id}" in result.mismatch.reason


async def test_deleting_the_newest_records_is_detected(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 4)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id == recs[-1].id))
    result = await audit.verify(engine)
    assert not result.ok
    assert result.mismatch.id == recs[-1].id
    assert "deleted" in result.mismatch.reason and "missing" in result.mismatch.reason


async def test_reordered_records_are_detected(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 6)
    a, b = recs[2].id, recs[3].id
    # Swap the positions (ids) of two neighbouring records, contents untouched.
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == a).values(id=-1))
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == b).values(id=a))
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == -1).values(id=b))
    result = await audit.verify(engine)
    assert not result.ok
    assert result.mismatch.id == a
    assert "reordered" in result.mismatch.reason


async def test_a_deleted_head_row_is_detected(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    await _fill(engine, tid, 2)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_heads).where(audit_heads.c.chain == tid))
    result = await audit.verify(engine)
    assert not result.ok and "head" in result.mismatch.reason


# --------------------------------------------------------------------------
# Concurrency: appends from several processes' engines serialize per chain
# --------------------------------------------------------------------------


async def test_concurrent_appends_from_several_engines_keep_one_chain(db_url: str) -> None:
    engines = [create_engine(db_url) for _ in range(4)]
    try:
        await migrate(engines[0])
        tid = await ensure_team(engines[0], "busy")
        other = await ensure_team(engines[0], "other")

        async def writer(eng: Any, w: int) -> None:
            for i in range(25):
                entries = [audit.Entry(action="test.concurrent", team_id=tid, actor=f"w{w}", detail={"i": i})]
                if i % 5 == 0:  # batches that touch two chains lock them in order
                    entries.append(audit.Entry(action="test.concurrent", team_id=other, actor=f"w{w}", detail={"i": i}))
                async with eng.begin() as conn:
                    await audit.append(conn, entries)

        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(writer, engines[w % 4], w)

        result = await audit.verify(engines[0])
        assert result.ok, result.mismatch
        assert result.verified == 8 * 25 + 8 * 5
        async with engines[0].connect() as conn:
            head = (await conn.execute(sa.select(audit_heads).where(audit_heads.c.chain == tid))).one()
        assert head.count == 200
    finally:
        for eng in engines:
            await eng.dispose()


# --------------------------------------------------------------------------
# The non-blocking writer
# --------------------------------------------------------------------------


async def test_audit_writer_never_blocks_and_drops_with_a_count_when_full(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    await migrate(engine)
    tid = await ensure_team(engine, "alpha")
    writer = audit.Audit(engine, maxsize=5, batch=3)
    # Hold SQLite's write lock: the writer cannot write, callers must not wait.
    blocker = sqlite3.connect(db, timeout=1)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            with anyio.fail_after(0.5):  # 8 records recorded at once, store locked
                for i in range(8):
                    writer.record_nowait(action="auth.failed", team_id=tid, actor=None, room_id=None, detail={"i": i})
            await anyio.sleep(0.2)
            assert writer.dropped >= 1
            blocker.rollback()
            assert await writer.flush(10)
            tg.cancel_scope.cancel()
    finally:
        blocker.close()
    result = await audit.verify(engine)
    assert result.ok and result.verified == 8 - writer.dropped
    await engine.dispose()


async def test_audit_writer_flushes_queued_records_when_stopped(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    writer = audit.Audit(engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        for i in range(50):
            writer.record_nowait(action="join.refused", team_id=tid, actor="x", room_id="job:1", detail={"i": i})
        tg.cancel_scope.cancel()
    result = await audit.verify(engine)
    assert result.ok and result.verified == 50


# --------------------------------------------------------------------------
# CLI: verify, export, token create/revoke records
# --------------------------------------------------------------------------


async def test_cli_verify_exit_codes_and_names_the_record(engine: Any, db_url: str) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 5)
    ok = run_cli("audit", "verify", db_url=db_url)
    assert ok.returncode == 0, ok.stderr
    assert "5 record(s) verified" in ok.stdout
    assert run_cli("audit", "verify", "--team", "alpha", db_url=db_url).returncode == 0
    assert run_cli("audit", "verify", "--team", "nope", db_url=db_url).returncode == 2

    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == recs[1].id).values(detail='{"i":99}'))
    bad = run_cli("audit", "verify", "--team", "alpha", db_url=db_url)
    assert bad.returncode == 1
    assert f"record id={recs[1].id}" in bad.stderr and "altered" in bad.stderr


async def test_cli_export_since_as_jsonl(engine: Any, db_url: str) -> None:
    tid = await ensure_team(engine, "alpha")
    old = await _fill(engine, tid, 3)
    async with engine.begin() as conn:  # make the first three a day old
        for rec in old:
            await conn.execute(sa.update(audit_log).where(audit_log.c.id == rec.id).values(created_at=rec.createdAt - 86_400_000))
    new = await _fill(engine, tid, 2, action="comment.create")
    result = run_cli("audit", "export", "--since", "1h", "--format", "jsonl", db_url=db_url)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in lines] == [r.id for r in new]
    assert {"id", "chain", "teamId", "actor", "action", "roomId", "detail", "createdAt", "prevHash", "hash"} <= set(lines[0])
    every = run_cli("audit", "export", "--format", "jsonl", db_url=db_url)
    assert len(every.stdout.splitlines()) == 5
    assert run_cli("audit", "export", "--since", "yesterday-ish", db_url=db_url).returncode == 2


async def test_cli_token_create_and_revoke_are_audited(db_url: str, engine: Any) -> None:
    created = run_cli("token", "create", "--user", "ana", "--team", "core", "--role", "admin", db_url=db_url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    listed = run_cli("token", "list", "--team", "core", db_url=db_url)
    token_id = listed.stdout.split("\t", 1)[0]
    assert "live" in listed.stdout and token not in listed.stdout

    revoked = run_cli("token", "revoke", token_id, "--actor", "ops", db_url=db_url)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    again = run_cli("token", "revoke", token_id, db_url=db_url)
    assert again.returncode == 0 and "already" in again.stdout
    assert run_cli("token", "revoke", "00000000-0000-0000-0000-000000000000", db_url=db_url).returncode == 1

    tid = await audit.team_id_for(engine, "core")
    recs = await audit.list_records(engine, team_id=tid)
    # The actor is the operator who ran the command; the token's user is the subject.
    assert [(r.action, r.actor) for r in recs] == [("token.create", f"cli:{getpass.getuser()}"), ("token.revoke", "ops")]
    assert recs[0].detail["user"] == "ana"
    assert all(r.detail["tokenId"] == token_id for r in recs)
    assert all(token not in json.dumps(r.detail) for r in recs)
    assert (await audit.verify(engine)).ok


def test_parse_since() -> None:
    assert audit.parse_since("1700000000") == 1_700_000_000_000
    assert audit.parse_since("1700000000000") == 1_700_000_000_000
    assert audit.parse_since("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert audit.parse_since("2h", now=10_000_000) == 10_000_000 - 7_200_000
    with pytest.raises(ValueError):
        audit.parse_since("soon")


async def test_a_row_added_behind_the_logs_back_is_named(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await _fill(engine, tid, 3)
    last = recs[-1]
    forged_detail = '{"i":7}'
    ring = audit_keys.for_engine(engine)
    forged = audit.compute_hash(
        prev_hash=last.hash, team_id=tid, actor="mallory", action="test.event", room_id=None, detail=forged_detail,
        created_at=last.createdAt + 1, key_id=ring.current_id, secret=ring.current_secret,
    )
    async with engine.begin() as conn:
        rid = await conn.scalar(
            sa.insert(audit_log)
            .values(
                team_id=tid, actor="mallory", action="test.event", room_id=None, detail=forged_detail,
                created_at=last.createdAt + 1, prev_hash=last.hash, hash=forged, key_id=ring.current_id,
            )
            .returning(audit_log.c.id)
        )
    result = await audit.verify(engine)
    assert not result.ok and result.mismatch.id == rid and "not part of the chain" in result.mismatch.reason


async def test_verify_pages_through_long_chains_and_tolerates_live_appends(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    async with engine.begin() as conn:
        await audit.append(conn, [audit.Entry(action="bulk", team_id=tid, detail={"i": i}) for i in range(120)])
    paged = await audit.verify(engine, "alpha", page=7)
    assert (paged.verified, paged.mismatch) == (120, None)

    async def appender() -> None:
        for i in range(30):
            await audit.record(engine, action="live", team_id=tid, detail={"i": i})

    async with anyio.create_task_group() as tg:
        tg.start_soon(appender)
        for _ in range(10):
            result = await audit.verify(engine, "alpha")
            assert result.ok, result.mismatch
            await anyio.sleep(0.01)


async def test_audit_writer_survives_odd_records(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    writer = audit.Audit(engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        writer.record_nowait(action="x" * 80, team_id=tid, actor="a" * 300, room_id="job:" + "r" * 100, detail={"o": object()})
        writer.record_nowait(action="auth.failed", team_id=tid, detail={"reason": "fine"})
        assert await writer.flush(10)
        tg.cancel_scope.cancel()
    recs = await audit.list_records(engine, team_id=tid)
    assert [len(r.action) for r in recs] == [50, 11] and len(recs[0].actor) == 100 and "repr" in recs[0].detail
    assert (await audit.verify(engine)).ok
