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
