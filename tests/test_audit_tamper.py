"""Tampering with the store by someone who holds the database but not the key or the witness.

Every test that takes ``engine`` runs on a real SQLite file and a real
PostgreSQL database. Each tampering is done with plain SQL, the way a
database administrator would, and ``verify`` must name the record.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import sqlalchemy as sa

from progress_service.events import JobSpec
from progress_service.ids import now_ms
from progress_service.settings import load_settings
from progress_service.store import audit
from progress_service.store import comments as comment_store
from progress_service.store.audit import keys as audit_keys
from progress_service.store.audit.witness import FileWitness
from progress_service.store.identity import ensure_team, ensure_user
from progress_service.store.jobs import create_job
from progress_service.store.migrations import MIGRATIONS
from progress_service.store.schema import audit_heads, audit_log, comments


async def put(engine: Any, team_id: str | None, n: int, *, keys: Any = None, action: str = "test.event") -> list[audit.AuditRecord]:
    async with engine.begin() as conn:
        return await audit.append(
            conn, [audit.Entry(action=action, team_id=team_id, actor=f"u{i}", detail={"i": i}) for i in range(n)], keys=keys
        )


async def witness_after(engine: Any, path: Path, ring: Any = None) -> audit.Checkpointer:
    """A checkpoint of every chain, as the app writes one."""
    cp = audit.Checkpointer(engine, FileWitness(path), ring or audit_keys.for_engine(engine), interval=60)
    await cp.checkpoint(every=True)
    return cp


async def verify_with(engine: Any, path: Path, team: str | None = None, ring: Any = None) -> audit.VerifyResult:
    ring = ring or audit_keys.for_engine(engine)
    return await audit.verify(engine, team, keys=ring, witness=FileWitness(path).read(ring))


async def move_head_to(conn: Any, chain: str, rec: audit.AuditRecord | None, count: int) -> None:
    await conn.execute(
        sa.update(audit_heads)
        .where(audit_heads.c.chain == chain)
        .values(count=count, last_id=rec.id if rec else None, last_hash=rec.hash if rec else audit.GENESIS)
    )


# --------------------------------------------------------------------------
# The four tamperings the SHA-256 chain let through
# --------------------------------------------------------------------------


async def test_deleting_the_newest_records_and_moving_the_head_is_caught_by_the_checkpoint(engine: Any, tmp_path: Path) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await put(engine, tid, 6)
    witness = tmp_path / "w.jsonl"
    await witness_after(engine, witness)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id.in_([recs[4].id, recs[5].id])))
        await move_head_to(conn, tid, recs[3], 4)
    assert (await audit.verify(engine)).ok  # rows and head agree: only the witness knows
    result = await verify_with(engine, witness)
    assert not result.ok
    problem = result.mismatch
    assert problem.chain == tid and problem.position == 5
    assert f"missing record #5 (the one after id={recs[3].id})" in problem.describe()
    assert "2 record(s) deleted" in problem.reason and f"id={recs[5].id}" in problem.reason


async def test_a_forged_row_with_a_correct_sha256_and_head_is_named(engine: Any) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await put(engine, tid, 3)
    last = recs[-1]
    detail, at = '{"i":99}', last.createdAt + 1
    forged = audit.compute_hash(
        prev_hash=last.hash, team_id=tid, actor="mallory", action="token.create", room_id=None, detail=detail, created_at=at
    )
    async with engine.begin() as conn:
        rid = await conn.scalar(
            sa.insert(audit_log)
            .values(team_id=tid, actor="mallory", action="token.create", room_id=None, detail=detail, created_at=at, prev_hash=last.hash, hash=forged)
            .returning(audit_log.c.id)
        )
        await conn.execute(sa.update(audit_heads).where(audit_heads.c.chain == tid).values(count=4, last_id=rid, last_hash=forged))
    result = await audit.verify(engine)
    assert not result.ok and result.mismatch.id == rid and result.mismatch.position == 4
    assert "unkeyed" in result.mismatch.reason and "forged" in result.mismatch.reason

    # The same row claiming the real key id, hashed with a guessed secret.
    ring = audit_keys.for_engine(engine)
    guessed = audit.compute_hash(
        prev_hash=last.hash, team_id=tid, actor="mallory", action="token.create", room_id=None, detail=detail,
        created_at=at, key_id=ring.current_id, secret=os.urandom(32),
    )
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == rid).values(key_id=ring.current_id, hash=guessed))
        await conn.execute(sa.update(audit_heads).where(audit_heads.c.chain == tid).values(last_hash=guessed))
    result = await audit.verify(engine)
    assert not result.ok and result.mismatch.id == rid and "forged without the key" in result.mismatch.reason


async def test_a_whole_chain_deleted_with_its_head_is_named(engine: Any, tmp_path: Path) -> None:
    alpha = await ensure_team(engine, "alpha")
    beta = await ensure_team(engine, "beta")
    await put(engine, alpha, 2)
    gone = await put(engine, beta, 3)
    witness = tmp_path / "w.jsonl"
    await witness_after(engine, witness)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.team_id == beta))
        await conn.execute(sa.delete(audit_heads).where(audit_heads.c.chain == beta))
    assert (await audit.verify(engine)).ok
    result = await verify_with(engine, witness)
    assert [p.chain for p in result.problems] == [beta]
    assert result.mismatch.describe().startswith(f"missing record #1 (chain {beta}")
    assert "vanished" in result.mismatch.reason and f"id={gone[-1].id}" in result.mismatch.reason
    # Verifying only that team names it too.
    only = await verify_with(engine, witness, team="beta")
    assert not only.ok and "vanished" in only.mismatch.reason


async def make_job(engine: Any, team: str) -> tuple[str, str]:
    team_id = await ensure_team(engine, team)
    user_id = await ensure_user(engine, "submitter")
    job_id = uuid.uuid4().hex[:12]
    await create_job(engine, job_id=job_id, team_id=team_id, user_id=user_id, spec=JobSpec(prompt="p"), created_at=now_ms(), demo=True)
    return job_id, team_id


async def test_an_edited_comment_is_named_and_served_marked_with_its_original_text(engine: Any) -> None:
    job_id, team_id = await make_job(engine, "alpha")
    room = f"job:{job_id}"
    stored = []
    for i, text in enumerate(["first", "second", "third"]):
        comment, _ = await comment_store.store_comment(
            engine, job_id=job_id, room_id=room, team_id=team_id, user_id="u1", user_name="ana", request_id=f"r{i}", text=text
        )
        stored.append(comment)
    assert (await audit.verify(engine)).ok
    assert [c.tampered for c in await comment_store.list_comments(engine, room)] == [False] * 3

    victim = stored[1]
    async with engine.begin() as conn:
        await conn.execute(sa.update(comments).where(comments.c.id == victim.commentId).values(text="I approve the deploy"))
    result = await audit.verify(engine)
    assert not result.ok and len(result.problems) == 1
    record = (await audit.list_records(engine, team_id=team_id))[1]
    assert result.mismatch.id == record.id
    assert f"comment id={victim.commentId} (record id={record.id})" in result.mismatch.describe()
    assert "text changed" in result.mismatch.reason

    served = await comment_store.list_comments(engine, room)
    assert [(c.text, c.tampered) for c in served] == [("first", False), ("second", True), ("third", False)]

    # Another author and a comment stored behind the log's back are named too.
    async with engine.begin() as conn:
        await conn.execute(sa.update(comments).where(comments.c.id == stored[2].commentId).values(user_name="boss"))
        await conn.execute(
            sa.insert(comments).values(
                job_id=job_id, room_id=room, team_id=team_id, user_id="u9", user_name="ghost", request_id="x",
                text="forged", created_at=now_ms(),
            )
        )
    described = [p.describe() for p in (await audit.verify(engine)).problems]
    assert len(described) == 3
    assert any("author changed" in d for d in described)
    assert any("has no comment.create record" in d for d in described)
    served = await comment_store.list_comments(engine, room)
    assert [(c.text, c.tampered) for c in served] == [("first", False), ("second", True), ("third", True), ("", True)]


async def test_a_replay_from_the_store_sends_an_edited_comment_with_its_audited_text(engine: Any) -> None:
    from progress_service.store import history  # noqa: PLC0415

    job_id, team_id = await make_job(engine, "alpha")
    for i, text in enumerate(["fine", "also fine"]):
        comment, _ = await comment_store.store_comment(
            engine, job_id=job_id, room_id=f"job:{job_id}", team_id=team_id, user_id="u1", user_name="ana",
            request_id=f"r{i}", text=text,
        )
        await comment_store.set_event_ids(engine, [(comment.commentId, f"{1000 + i}-0")])
    async with engine.begin() as conn:
        await conn.execute(sa.update(comments).where(comments.c.text == "fine").values(text="rewritten"))
    entries = await history.read_entries(engine, job_id, None)
    bodies = [msgspec.json.decode(fields[b"b"]) for _, fields in entries]
    assert [(b["text"], b.get("tampered", False)) for b in bodies] == [("fine", True), ("also fine", False)]
    assert "tampered" not in bodies[1]  # an untouched comment's entry is byte for byte what Redis holds


# --------------------------------------------------------------------------
# The witness
# --------------------------------------------------------------------------


async def test_a_checkpoint_with_a_bad_signature_and_a_head_moved_backwards_are_named(engine: Any, tmp_path: Path) -> None:
    tid = await ensure_team(engine, "alpha")
    recs = await put(engine, tid, 5)
    witness = tmp_path / "w.jsonl"
    await witness_after(engine, witness)
    # Truncate and move the head; a freshly started node checkpoints the shorter chain.
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id == recs[4].id))
        await move_head_to(conn, tid, recs[3], 4)
    await witness_after(engine, witness)
    result = await verify_with(engine, witness)
    reasons = [p.describe() for p in result.problems]
    assert any("missing record #5" in r for r in reasons)
    assert any("line 2" in r and "moved backwards" in r for r in reasons)

    # Someone edits the witness's line to agree with the store: its signature fails.
    lines = witness.read_text().splitlines()
    witness.write_text(lines[0].replace('"count":5', '"count":4') + "\n")
    result = await verify_with(engine, witness)
    assert any("line 1" in p.describe() and "bad signature" in p.reason for p in result.problems)


async def test_a_redis_stream_witness_catches_a_truncation_too(engine: Any, redis: Any, redis_url: str) -> None:
    from progress_service.store.audit.witness import RedisWitness, open_witness  # noqa: PLC0415

    stream = f"ps:test:witness:{uuid.uuid4().hex[:8]}"
    witness = open_witness(load_settings(env={}, audit_witness=f"{redis_url}#{stream}"))
    assert isinstance(witness, RedisWitness) and witness.stream == stream
    try:
        tid = await ensure_team(engine, "alpha")
        recs = await put(engine, tid, 4)
        ring = audit_keys.for_engine(engine)
        await audit.Checkpointer(engine, witness, ring, interval=60).checkpoint(every=True)
        assert await redis.xlen(stream) == 1
        async with engine.begin() as conn:
            await conn.execute(sa.delete(audit_log).where(audit_log.c.id == recs[-1].id))
            await move_head_to(conn, tid, recs[-2], 3)
        result = await audit.verify(engine, keys=ring, witness=witness.read(ring))
        assert not result.ok and "missing record #4" in result.mismatch.describe()
    finally:
        await redis.delete(stream)


async def test_a_torn_last_witness_line_is_ignored_and_reported(engine: Any, tmp_path: Path) -> None:
    tid = await ensure_team(engine, "alpha")
    await put(engine, tid, 3)
    witness = tmp_path / "w.jsonl"
    checkpointer = await witness_after(engine, witness)
    whole = witness.read_bytes()
    with witness.open("ab") as fh:  # a crash half-way through the next line
        fh.write(whole[: len(whole) // 2])
    result = await verify_with(engine, witness)
    assert result.ok and result.checkpointed == 1
    assert any("torn line(s) 2" in n for n in result.notes)
    # The next checkpoint starts on a line of its own and is read.
    await put(engine, tid, 2)
    assert await checkpointer.checkpoint() == 1
    result = await verify_with(engine, witness)
    assert result.ok and result.verified == 5
    latest = FileWitness(witness).read(audit_keys.for_engine(engine)).latest()[tid][1]
    assert latest.count == 5


async def test_the_writer_checkpoints_while_appending_and_a_live_store_verifies(engine: Any, tmp_path: Path) -> None:
    job_id, tid = await make_job(engine, "alpha")
    witness = tmp_path / "w.jsonl"
    ring = audit_keys.for_engine(engine)
    checkpointer = audit.Checkpointer(engine, FileWitness(witness), ring, interval=0.05)
    writer = audit.Audit(engine, keys=ring, checkpointer=checkpointer)
    appending = anyio.Event()

    async def comment_while_verifying() -> None:
        # Comments (and their records) land while verify walks and compares.
        i = 0
        while not appending.is_set():
            await comment_store.store_comment(
                engine, job_id=job_id, room_id=f"job:{job_id}", team_id=tid, user_id="u1", user_name="ana",
                request_id=f"c{i}", text=f"comment {i}",
            )
            i += 1
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        tg.start_soon(comment_while_verifying)
        for i in range(40):
            writer.record_nowait(action="auth.failed", team_id=tid, detail={"i": i})
            await put(engine, tid, 1)
            if i % 10 == 9:
                result = await verify_with(engine, witness)  # appends and checkpoints keep going meanwhile
                assert result.ok, result.problems
            await anyio.sleep(0.01)
        appending.set()
        assert await writer.flush(10)
        tg.cancel_scope.cancel()
    async with engine.connect() as conn:
        total = int(await conn.scalar(sa.select(sa.func.count()).select_from(audit_log)))
    contents = FileWitness(witness).read(ring)
    assert len(contents.checkpoints) >= 3 and not contents.bad
    # The shutdown checkpoint pins everything written.
    assert contents.latest()[tid][1].count == total > 80
    result = await verify_with(engine, witness)
    assert result.ok and result.verified == total and result.checkpointed == 1 and result.comments == total - 80


# --------------------------------------------------------------------------
# Keys: rotation, unknown key ids, legacy records, the key file
# --------------------------------------------------------------------------


async def test_records_under_two_key_ids_verify_and_an_unknown_key_id_is_named(engine: Any, tmp_path: Path) -> None:
    path = tmp_path / "rot.key"
    first = audit_keys.load_or_create(path)
    tid = await ensure_team(engine, "alpha")
    await put(engine, tid, 3, keys=first)
    new_id, old_id = audit_keys.rotate(path)
    assert old_id == first.current_id and new_id != old_id
    second = audit_keys.read_keyring(path)
    assert second.current_id == new_id and set(second.secrets) == {old_id, new_id}
    recs = await put(engine, tid, 3, keys=second)
    assert {r.keyId for r in await audit.list_records(engine, team_id=tid)} == {old_id, new_id}
    assert (await audit.verify(engine, keys=second)).ok

    # Only the old key: the newer records are named by their unknown key id.
    result = await audit.verify(engine, keys=first)
    assert not result.ok and result.mismatch.id == recs[0].id
    assert f"unknown key id {new_id!r}" in result.mismatch.reason
    # A record claiming a key id nobody issued.
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == recs[1].id).values(key_id="kdeadbeef0000"))
    result = await audit.verify(engine, keys=second)
    assert result.mismatch.id == recs[1].id and "unknown key id 'kdeadbeef0000'" in result.mismatch.reason


async def test_legacy_records_from_before_the_migration_keep_verifying(engine: Any, tmp_path: Path) -> None:
    tid = await ensure_team(engine, "alpha")
    # A store as it was before keyed records (migration 4): no key_id column, SHA-256 records.
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP INDEX ix_audit_room"))
        await conn.execute(sa.text("ALTER TABLE audit_log DROP COLUMN key_id"))
        prev = audit.GENESIS
        for i in range(4):
            at = 1_600_000_000_000 + i
            digest = audit.compute_hash(prev_hash=prev, team_id=tid, actor="old", action="token.create", room_id=None, detail="{}", created_at=at)
            await conn.execute(
                sa.text(
                    "INSERT INTO audit_log (team_id, actor, action, room_id, detail, created_at, prev_hash, hash) "
                    "VALUES (:t, 'old', 'token.create', NULL, '{}', :at, :p, :h)"
                ),
                {"t": tid, "at": at, "p": prev, "h": digest},
            )
            prev = digest
        await conn.execute(sa.insert(audit_heads).values(chain=tid, count=4, last_id=None, last_hash=prev, updated_at=0))
        last_id = await conn.scalar(sa.select(sa.func.max(sa.column("id"))).select_from(sa.table("audit_log")))
        await conn.execute(sa.update(audit_heads).where(audit_heads.c.chain == tid).values(last_id=last_id))
    (step,) = [step for _, name, step in MIGRATIONS if name == "keyed audit records"]
    async with engine.begin() as conn:
        await step(conn)
    async with engine.connect() as conn:
        assert "key_id" in await conn.run_sync(lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("audit_log")})
    await put(engine, tid, 2)
    result = await audit.verify(engine)
    assert result.ok and (result.verified, result.legacy) == (6, 4)
    # Rewriting a legacy record (SHA-256, recomputable) is still caught by the next link.
    async with engine.begin() as conn:
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == last_id).values(actor="mallory"))
    assert (await audit.verify(engine)).mismatch.id == last_id


def test_the_key_file_is_created_private_beside_the_sqlite_file(tmp_path: Path) -> None:
    settings = load_settings(env={}, database_url=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}")
    path = audit_keys.key_file_path(settings)
    assert path == tmp_path / "dev.db.audit-key"
    ring = audit_keys.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert audit_keys.load_or_create(path).secrets == ring.secrets  # the second start reads it
    from progress_service.store.audit.witness import witness_path  # noqa: PLC0415

    assert witness_path(settings) == tmp_path / "dev.db.audit-witness.jsonl"
    assert witness_path(load_settings(env={}, audit_witness="off")) is None
