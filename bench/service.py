"""The system under test: a private Redis, a fresh store, the app as a subprocess.

Nothing touches the shared Redis or the developers' databases: Redis is an
embedded ``redis-server`` on a free port, SQLite lives in a temp dir, and a
PostgreSQL run gets a throwaway database that is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench import stats
from bench.orchestra import log
from bench.tuning import pin_tree
from progress_service.embedded_redis import embedded_redis, free_port, redis_binary
from progress_service.keys import snapshot_key

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def pg_answers(url: str) -> bool:
    """True when a PostgreSQL server answers at ``url`` (libpq form)."""
    import asyncpg

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@contextlib.contextmanager
def throwaway_pg(admin_url: str, prefix: str = "ps_bench"):
    """A fresh PostgreSQL database (SQLAlchemy asyncpg URL), dropped on exit.

    The tests' per-test databases use it too (``prefix="ps_test"``).
    """
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"postgresql+asyncpg://{base.split('://', 1)[1]}/{name}"
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Service:
    """Redis + store + app server for one scenario. Use as a context manager."""

    def __init__(self, *, env: dict[str, str] | None = None, pg_admin: str | None = None,
                 ws_impl: str | None = None, loop: str = "asyncio", tracemalloc: bool = False) -> None:
        self.extra_env = env or {}
        #: Run the server under tracemalloc (``bench.serve --tracemalloc``): see :meth:`memory_since`.
        self.tracemalloc = tracemalloc
        self.pg_admin = pg_admin
        self.ws_impl = ws_impl
        self.loop = loop
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="ps-bench-"))
        self.redis_url = ""
        self.database_url = ""
        self.log_path = self.tmp / "server.log"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Service:
        self._stack.callback(shutil.rmtree, self.tmp, True)
        self.redis_url = self._stack.enter_context(embedded_redis())
        if self.pg_admin:
            self.database_url = self._stack.enter_context(throwaway_pg(self.pg_admin))
        else:
            self.database_url = f"sqlite+aiosqlite:///{self.tmp / 'store.db'}"
        (self.tmp / "workspace").mkdir()
        asyncio.run(self._migrate())
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if exc_type is not None:
                # The temp dir goes away; keep the server's log for the post-mortem.
                kept = Path(tempfile.gettempdir()) / "ps-bench-last-server.log"
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.log_path, kept)
                    log(f"server log kept at {kept}")
            self._stack.close()

    async def _migrate(self) -> None:
        from progress_service.store.db import create_engine
        from progress_service.store.migrations import migrate

        engine = create_engine(self.database_url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    @property
    def store_kind(self) -> str:
        return "postgresql" if self.database_url.startswith("postgresql") else "sqlite"

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env.update(
            PS_REDIS_URL=self.redis_url,
            PS_DATABASE_URL=self.database_url,
            PS_WORKSPACE_ROOT=str(self.tmp / "workspace"),
            PS_LOG_LEVEL="warning",
            PS_HTTP_RATE_LIMIT="1000000",
            # The audit key and witness of a throwaway store stay beside it,
            # not in the working directory (a PostgreSQL store has no file to
            # put them next to); a caller's own (the tests') wins.
            PS_AUDIT_KEY_FILE=os.environ.get("PS_AUDIT_KEY_FILE", str(self.tmp / "audit.key")),
            PS_AUDIT_WITNESS=os.environ.get("PS_AUDIT_WITNESS", str(self.tmp / "audit-witness.jsonl")),
        )
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        """The server's command line: the real CLI unless a ws implementation or loop is chosen."""
        if self.ws_impl is None and self.loop == "asyncio" and not self.tracemalloc:
            return [sys.executable, "-m", "progress_service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        trace = ["--tracemalloc", str(self.tmp / "tracemalloc.txt")] if self.tracemalloc else []
        return [sys.executable, "-m", "bench.serve", "--port", str(self.port),
                "--ws", self.ws_impl or "direct", "--loop", self.loop, *trace]

    def memory_baseline(self) -> None:
        """tracemalloc: start counting allocations from now."""
        os.kill(self.pid, signal.SIGUSR1)

    def memory_since(self, timeout: float = 60.0) -> list[tuple[int, int, str]]:
        """tracemalloc: ``(bytes, blocks, file:line)`` allocated and still held since the baseline."""
        path = self.tmp / "tracemalloc.txt"
        path.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the server wrote no tracemalloc statistics")
            time.sleep(0.1)
        out = []
        for line in path.read_text().splitlines():
            size, count, where = line.split(" ", 2)
            out.append((int(size), int(count), where))
        return out

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (same port on a restart) and wait for /readyz."""
        log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), env=self.server_env(), cwd=str(ROOT), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    log(f"server pid {self.proc.pid} ready on port {self.port} ({self.store_kind})")
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no close frames) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server (graceful), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- measurements ------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return stats.cpu_seconds(self.pid)

    def rss(self) -> int:
        return stats.rss_bytes(self.pid)

    def server_counters(self) -> dict[str, float]:
        """The server's own Prometheus counters (hub reads, frames and messages out), {} if unreadable."""
        wanted = ("ps_hub_reads_total", "ps_ws_frames_out_total", "ps_ws_messages_out_total")
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                out[name] = float(value)
        return out

    def redis_cpu(self) -> float:
        """CPU seconds the private redis-server has used (INFO cpu): Redis work is part of the cost."""
        from redis import Redis

        client = Redis.from_url(self.redis_url)
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_pid(self) -> int:
        """The private redis-server's pid (``INFO server``)."""
        from redis import Redis

        client = Redis.from_url(self.redis_url)
        try:
            return int(client.info("server")["process_id"])
        finally:
            client.close()

    def pin(self, cpus: set[int]) -> None:
        """Pin the server's process tree and its Redis (part of what it costs) to ``cpus``."""
        pin_tree(self.pid, cpus)
        pin_tree(self.redis_pid(), cpus)

    @staticmethod
    def redis_server_binary() -> str:
        return redis_binary()

    # -- fixtures: tokens and jobs ----------------------------------------

    def tokens(self, count: int, *, role: str, team: str = "bench", prefix: str | None = None) -> list[str]:
        """``count`` API tokens, one user each (``<prefix>-<i>``), in ``team``."""
        return asyncio.run(self._tokens(count, role, team, prefix or role))

    async def _tokens(self, count: int, role: str, team: str, prefix: str) -> list[str]:
        from progress_service.store.db import create_engine
        from progress_service.store.identity import create_token

        engine = create_engine(self.database_url)
        try:
            out = []
            for i in range(count):
                token, _ = await create_token(engine, user=f"{prefix}-{i}", team=team, role=role, label="bench")
                out.append(token)
            return out
        finally:
            await engine.dispose()

    def jobs(self, count: int, *, team: str = "bench") -> list[str]:
        """``count`` running jobs of ``team`` (SQL rows + live snapshots in Redis)."""
        return asyncio.run(self._jobs(count, team))

    async def _jobs(self, count: int, team: str) -> list[str]:
        from redis.asyncio import Redis

        from progress_service.events import JobSnapshot, JobSpec
        from progress_service.ids import now_ms
        from progress_service.store.db import create_engine
        from progress_service.store.identity import ensure_team, ensure_user
        from progress_service.store.jobs import create_job
        from progress_service.streams import put_snapshot
        from progress_service.ids import room_id

        engine = create_engine(self.database_url)
        redis = Redis.from_url(self.redis_url)
        try:
            team_id = await ensure_team(engine, team)
            user_id = await ensure_user(engine, "bench-submitter")
            ids = []
            for _ in range(count):
                job_id = uuid.uuid4().hex[:16]
                await create_job(engine, job_id=job_id, team_id=team_id, user_id=user_id,
                                 spec=JobSpec(prompt="benchmark job"), created_at=now_ms(), demo=True)
                await put_snapshot(redis, job_id, JobSnapshot(id=job_id, roomId=room_id(job_id), status="running",
                                                              phase="testing", prompt="benchmark job", demo=True))
                # A running job's Redis has held its stream from the first entry on
                # (streams.append_event marks it): joins then read no archive.
                await redis.hsetnx(snapshot_key(job_id), "k", 1)
                ids.append(job_id)
            return ids
        finally:
            await redis.aclose()
            await engine.dispose()
