"""``python -m bench.audit_verify [--records N] [--chains C] [--backend sqlite|postgres]``

How long ``audit verify`` takes on a large store: builds a store with N keyed
records (default 1,000,000) over C team chains, one in ten a
``comment.create`` with its comment row, checkpoints every chain to a witness
file, then times the verification that ``progress-service audit verify``
runs (links, HMACs, heads, checkpoints, every comment against its record).
Prints one JSON line with the figures.

The records are written straight into the tables in bulk (the append path
is measured elsewhere), chained and keyed exactly as ``append`` does: the
verification must find them all valid, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from progress_service.store.audit import chain as audit_chain
from progress_service.store.audit.keys import Keyring
from progress_service.store.audit.verify import verify
from progress_service.store.audit.witness import FileWitness
from progress_service.store.audit.writer import Checkpointer
from progress_service.store.db import create_engine
from progress_service.store.migrations import migrate

COMMENT_EVERY = 10


def generate(n: int, chains: list[str], ring: Keyring, job_of: dict[str, str]) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None]]:
    """``(audit row, comment row or None)`` for n records, round-robin over the chains."""
    prev = dict.fromkeys(chains, audit_chain.GENESIS)
    kid, secret = ring.current_id, ring.current_secret
    base = audit_chain.now_ms() - n
    for i in range(n):
        team = chains[i % len(chains)]
        at = base + i
        comment = None
        if i % COMMENT_EVERY == 0:
            cid = i // COMMENT_EVERY + 1
            text = f"comment {i}"
            room = f"job:{job_of[team]}"
            detail = audit_chain.canonical_json(
                {"commentId": cid, "jobId": job_of[team], "userId": "u1", "requestId": f"r{i}", "text": text,
                 "textSha256": hashlib.sha256(text.encode()).hexdigest()}
            )
            action, actor = "comment.create", "ana"
            comment = (cid, job_of[team], room, team, "u1", "ana", f"r{i}", text, None, at)
        else:
            room, detail, action, actor = None, audit_chain.canonical_json({"reason": "bench", "i": i}), "auth.failed", None
        digest = audit_chain.compute_hash(
            prev_hash=prev[team], team_id=team, actor=actor, action=action, room_id=room, detail=detail,
            created_at=at, key_id=kid, secret=secret,
        )
        yield (i + 1, team, actor, action, room, detail, at, prev[team], digest, kid), comment
        prev[team] = digest


async def prepare_schema(url: str, chains: list[str]) -> dict[str, str]:
    """Migrate and create the teams, users and one job per team; job id per team."""
    from progress_service.events import JobSpec  # noqa: PLC0415
    from progress_service.store.identity import ensure_user  # noqa: PLC0415
    from progress_service.store.jobs import create_job  # noqa: PLC0415
    from progress_service.store.schema import teams  # noqa: PLC0415

    engine = create_engine(url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            await conn.execute(teams.insert(), [{"id": t, "name": f"team-{t[:8]}", "created_at": 0} for t in chains])
        uid = await ensure_user(engine, "bench")
        jobs = {}
        for team in chains:
            jobs[team] = uuid.uuid4().hex[:12]
            await create_job(engine, job_id=jobs[team], team_id=team, user_id=uid, spec=JobSpec(prompt="p"), created_at=0, demo=True)
        return jobs
    finally:
        await engine.dispose()


AUDIT_COLUMNS = "id, team_id, actor, action, room_id, detail, created_at, prev_hash, hash, key_id"
COMMENT_COLUMNS = "id, job_id, room_id, team_id, user_id, user_name, request_id, text, event_id, created_at"


def fill_sqlite(path: Path, rows: Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None]], chains: list[str]) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    audit_batch, comment_batch = [], []
    last: dict[str, tuple[int, int, str]] = {}
    for rec, comment in rows:
        audit_batch.append(rec)
        count = last.get(rec[1], (0, 0, ""))[0] + 1
        last[rec[1]] = (count, rec[0], rec[8])
        if comment:
            comment_batch.append(comment)
        if len(audit_batch) >= 50_000:
            db.executemany(f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", audit_batch)
            db.executemany(f"INSERT INTO comments ({COMMENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", comment_batch)
            audit_batch.clear()
            comment_batch.clear()
    db.executemany(f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", audit_batch)
    db.executemany(f"INSERT INTO comments ({COMMENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", comment_batch)
    db.executemany(
        "INSERT INTO audit_heads (chain, count, last_id, last_hash, updated_at) VALUES (?,?,?,?,0)",
        [(c, *last[c]) for c in chains],
    )
    db.commit()
    db.close()


async def fill_postgres(url: str, rows: Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None]], chains: list[str]) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        audit_batch, comment_batch = [], []
        last: dict[str, tuple[int, int, str]] = {}

        async def flush() -> None:
            await conn.copy_records_to_table("audit_log", records=audit_batch, columns=AUDIT_COLUMNS.split(", "))
            await conn.copy_records_to_table("comments", records=comment_batch, columns=COMMENT_COLUMNS.split(", "))
            audit_batch.clear()
            comment_batch.clear()

        for rec, comment in rows:
            audit_batch.append(rec)
            count = last.get(rec[1], (0, 0, ""))[0] + 1
            last[rec[1]] = (count, rec[0], rec[8])
            if comment:
                comment_batch.append(comment)
            if len(audit_batch) >= 50_000:
                await flush()
        await flush()
        await conn.executemany(
            "INSERT INTO audit_heads (chain, count, last_id, last_hash, updated_at) VALUES ($1,$2,$3,$4,0)",
            [(c, *last[c]) for c in chains],
        )
        for table in ("audit_log", "comments"):  # the serial columns continue after the bulk ids
            await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def measure(url: str, ring: Keyring, witness: Path) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        await Checkpointer(engine, FileWitness(witness), ring, interval=60).checkpoint(every=True)
        started, cpu = time.perf_counter(), time.process_time()
        result = await verify(engine, keys=ring, witness=FileWitness(witness).read(ring))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await engine.dispose()
    if not result.ok:
        raise SystemExit(f"bench: the generated store does not verify: {result.mismatch.describe()}")
    return {"verified": result.verified, "comments": result.comments, "checkpointed": result.checkpointed,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "load_avg_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.audit_verify", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--pg-admin-url", default=os.environ.get("PS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)

    ring = Keyring.generate()
    chains = [str(uuid.uuid4()) for _ in range(args.chains)]
    with tempfile.TemporaryDirectory(prefix="ps-audit-bench-") as tmp:
        witness = Path(tmp) / "witness.jsonl"
        if args.backend == "sqlite":
            path = Path(tmp) / "audit.db"
            url = f"sqlite+aiosqlite:///{path}"
            jobs = asyncio.run(prepare_schema(url, chains))
            t0 = time.perf_counter()
            fill_sqlite(path, generate(args.records, chains, ring, jobs), chains)
            figures = {"fill_seconds": round(time.perf_counter() - t0, 1), **asyncio.run(measure(url, ring, witness))}
        else:
            from bench.service import throwaway_pg  # noqa: PLC0415

            with throwaway_pg(args.pg_admin_url, prefix="ps_bench_audit") as url:
                jobs = asyncio.run(prepare_schema(url, chains))
                t0 = time.perf_counter()
                asyncio.run(fill_postgres(url, generate(args.records, chains, ring, jobs), chains))
                figures = {"fill_seconds": round(time.perf_counter() - t0, 1), **asyncio.run(measure(url, ring, witness))}
    figures.update(
        scenario="audit_verify",
        backend=args.backend,
        records=args.records,
        chains=args.chains,
        records_per_second=round(figures["verified"] / figures["seconds"]) if figures["seconds"] else None,
        python=platform.python_version(),
        cpus=os.cpu_count(),
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
