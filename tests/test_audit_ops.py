"""The audit log's operations end to end: the real app writes keyed records and
checkpoints, the HTTP comments API marks an edited comment, and the CLI
(``audit verify --witness``, ``export``, ``verify --export``, ``rotate-key``)
names what was tampered with. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from progress_service.store.db import create_engine
from progress_service.store.schema import audit_heads, audit_log, comments

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, db_url: str, key: Path, witness: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(PS_DATABASE_URL=db_url, PS_AUDIT_KEY_FILE=str(key), PS_AUDIT_WITNESS=str(witness))
    return subprocess.run(
        [sys.executable, "-m", "progress_service.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def test_app_checkpoints_the_api_marks_edits_and_the_cli_names_them(
    db_url: str, make_settings: Any, make_token: Any, live_server: Any, tmp_path: Path
) -> None:
    key, witness = tmp_path / "keys" / "audit.key", tmp_path / "witness.jsonl"
    (tmp_path / "keys").mkdir()
    settings = make_settings(
        database_url=db_url, audit_key_file=str(key), audit_witness=str(witness), audit_checkpoint_seconds=0.2
    )
    token = await make_token(role="admin", team="core", database_url=db_url)
    headers = {"Authorization": f"Bearer {token}"}
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=headers) as client:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600  # created on first start
        job = (await client.post("/api/jobs", json={"prompt": "p"})).json()
        path = f"/api/jobs/{job['id']}/comments"
        for i, text in enumerate(["looks good", "ship it"]):
            r = await client.post(path, json={"text": text}, headers={"Idempotency-Key": f"k{i}"})
            assert r.status_code == 201, r.text
        page = (await client.get(path)).json()
        assert [(c["text"], c["tampered"]) for c in page["items"]] == [("looks good", False), ("ship it", False)]
    # Stopped: the shutdown checkpoint pins every chain.
    lines = [json.loads(line) for line in witness.read_text().splitlines()]
    assert lines and all(set(line) >= {"chain", "count", "lastId", "lastHash", "at", "kid", "sig"} for line in lines)

    ok = cli("audit", "verify", db_url=db_url, key=key, witness=witness)
    assert ok.returncode == 0, ok.stderr
    assert "checked against witness checkpoints" in ok.stdout and "2 comment(s) match" in ok.stdout

    export = tmp_path / "core.jsonl"
    done = cli("audit", "export", "--team", "core", "-o", str(export), db_url=db_url, key=key, witness=witness)
    assert done.returncode == 0, done.stderr
    exported = export.read_text().splitlines()
    assert json.loads(exported[-1])["checkpoint"]["count"] == len(exported) - 1
    offline = cli("audit", "verify", "--export", str(export), db_url="sqlite:///nowhere.db", key=key, witness=witness)
    assert offline.returncode == 0, offline.stderr
    cut = tmp_path / "cut.jsonl"  # the newest record dropped from the export
    cut.write_text("\n".join(exported[:-2] + exported[-1:]) + "\n")
    bad = cli("audit", "verify", "--export", str(cut), db_url="sqlite:///nowhere.db", key=key, witness=witness)
    assert bad.returncode == 1 and "missing record" in bad.stderr

    # The database's administrator edits a comment, then deletes the newest
    # record and moves the head back.
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.update(comments).where(comments.c.text == "looks good").values(text="deploy to prod now"))
            newest = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(1))).one()
            rows = (
                await conn.execute(sa.select(audit_log).where(audit_log.c.team_id == newest.team_id).order_by(audit_log.c.id))
            ).all()
            before = rows[-2]
            await conn.execute(sa.delete(audit_log).where(audit_log.c.id == newest.id))
            await conn.execute(
                sa.update(audit_heads)
                .where(audit_heads.c.chain == newest.team_id)
                .values(count=audit_heads.c.count - 1, last_id=before.id, last_hash=before.hash)
            )
    finally:
        await engine.dispose()
    copy = tmp_path / "auditor-copy.jsonl"
    copy.write_bytes(witness.read_bytes())
    failed = cli("audit", "verify", "--witness", str(copy), db_url=db_url, key=key, witness=tmp_path / "unused")
    assert failed.returncode == 1, failed.stderr
    assert f"missing record #{len(rows)} (the one after id={before.id})" in failed.stderr
    first_comment = next(r for r in rows if r.action == "comment.create")
    assert f"(record id={first_comment.id}) (chain {newest.team_id}): differs from its comment.create record: text" in failed.stderr

    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base, headers=headers) as client:
        page = (await client.get(path)).json()
        # The edited comment is served marked, with the text its record holds.
        assert (page["items"][0]["text"], page["items"][0]["tampered"]) == ("looks good", True)
    # The restarted node read the witness and refused to sign the shortened chain.
    counts = [json.loads(line)["count"] for line in witness.read_text().splitlines() if json.loads(line)["chain"] == newest.team_id]
    assert min(counts[counts.index(len(rows)) :]) == len(rows)

    rotated = cli("audit", "rotate-key", db_url=db_url, key=key, witness=witness)
    assert rotated.returncode == 0 and "new current key" in rotated.stdout
    assert len(json.loads(key.read_text())["keys"]) == 2 and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_the_verify_benchmark_runs_small() -> None:
    # The figure in docs/performance.md comes from --records 1000000; this only
    # checks the script builds a store that verifies.
    done = subprocess.run(
        [sys.executable, "-m", "bench.audit_verify", "--records", "3000", "--chains", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    assert (figures["verified"], figures["comments"], figures["checkpointed"]) == (3000, 300, 3)


async def test_cli_verify_names_every_kind_of_tampering_at_once(engine: Any, db_url: str, tmp_path: Path) -> None:
    """One team per tampering, done with plain SQL after a checkpoint; one ``audit verify`` names them all."""
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store import comments as comment_store  # noqa: PLC0415
    from progress_service.store.audit import keys as audit_keys  # noqa: PLC0415
    from progress_service.store.audit.witness import FileWitness  # noqa: PLC0415
    from progress_service.store.identity import ensure_team  # noqa: PLC0415
    from test_audit_tamper import make_job, move_head_to, put  # noqa: PLC0415

    key = Path(os.environ["PS_AUDIT_KEY_FILE"])
    witness = tmp_path / "w.jsonl"
    names = ["truncated", "forged", "vanished", "comment", "altered", "deleted", "unknown-key", "untouched"]
    teams = {name: await ensure_team(engine, name) for name in names}
    recs = {name: await put(engine, teams[name], 4) for name in names}
    job_id, _ = await make_job(engine, "comment")
    stored, _ = await comment_store.store_comment(
        engine, job_id=job_id, room_id=f"job:{job_id}", team_id=teams["comment"], user_id="u1", user_name="ana",
        request_id="r1", text="approved with conditions",
    )
    await audit.Checkpointer(engine, FileWitness(witness), audit_keys.for_engine(engine), interval=60).checkpoint(every=True)

    t, r = teams, recs
    async with engine.begin() as conn:
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id == r["truncated"][-1].id))
        await move_head_to(conn, t["truncated"], r["truncated"][-2], 3)
        last = r["forged"][-1]
        forged_hash = audit.compute_hash(
            prev_hash=last.hash, team_id=t["forged"], actor="mallory", action="token.create", room_id=None, detail="{}",
            created_at=last.createdAt + 1,
        )
        forged_id = await conn.scalar(
            sa.insert(audit_log).values(
                team_id=t["forged"], actor="mallory", action="token.create", room_id=None, detail="{}",
                created_at=last.createdAt + 1, prev_hash=last.hash, hash=forged_hash,
            ).returning(audit_log.c.id)
        )
        await conn.execute(sa.update(audit_heads).where(audit_heads.c.chain == t["forged"]).values(count=5, last_id=forged_id, last_hash=forged_hash))
        await conn.execute(sa.delete(audit_log).where(audit_log.c.team_id == t["vanished"]))
        await conn.execute(sa.delete(audit_heads).where(audit_heads.c.chain == t["vanished"]))
        await conn.execute(sa.update(comments).where(comments.c.id == stored.commentId).values(text="approved"))
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == r["altered"][1].id).values(actor="mallory"))
        await conn.execute(sa.delete(audit_log).where(audit_log.c.id == r["deleted"][1].id))
        await conn.execute(sa.update(audit_log).where(audit_log.c.id == r["unknown-key"][2].id).values(key_id="knobody"))

    done = cli("audit", "verify", "--witness", str(witness), db_url=db_url, key=key, witness=witness)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    expected = {
        "truncated": f"missing record #4 (the one after id={r['truncated'][-2].id}) (chain {t['truncated']}",
        "forged": f"record id={forged_id} (chain {t['forged']}, #5): an unkeyed (SHA-256) record after keyed ones",
        "vanished": f"missing record #1 (chain {t['vanished']}, #1): the chain vanished",
        "comment": f"comment id={stored.commentId} (record id=",
        "altered": f"record id={r['altered'][1].id} (chain {t['altered']}, #2): contents do not match its hash",
        "deleted": f"record id={r['deleted'][2].id} (chain {t['deleted']}, #2): prev_hash does not match record id={r['deleted'][0].id}",
        "unknown-key": f"record id={r['unknown-key'][2].id} (chain {t['unknown-key']}, #3): keyed with unknown key id 'knobody'",
    }
    for name, needle in expected.items():
        assert needle in err, f"{name}: {needle!r} not in\n{err}"
    assert t["untouched"] not in err
    assert len([line for line in err.splitlines() if line.startswith("  ")]) == len(expected)
