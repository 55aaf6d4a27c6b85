"""The ``progress-service`` command: token, migrate, settings errors and ``dev``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from progress_service.embedded_redis import free_port
from progress_service.store.db import create_engine
from progress_service.store.identity import principal_for_token
from progress_service.store.migrations import MIGRATIONS, migrate
from progress_service.store.schema import api_tokens

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "progress_service.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(extra)
    return env


async def test_token_create_prints_only_a_token_stored_as_a_hash(db_url: str) -> None:
    assert run_cli("migrate", env=clean_env(PS_DATABASE_URL=db_url)).returncode == 0  # token create needs a store
    result = run_cli(
        "token", "create", "--user", "ana", "--team", "core", "--role", "reviewer", env=clean_env(PS_DATABASE_URL=db_url)
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert re.fullmatch(r"ps_[A-Za-z0-9_-]{40,}", token)

    engine = create_engine(db_url)
    try:
        principal = await principal_for_token(engine, token)
        assert principal is not None
        assert (principal.user_name, principal.team_name, principal.role) == ("ana", "core", "reviewer")
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(api_tokens))).all()
        assert len(rows) == 1
        assert token not in repr(tuple(rows[0]))
    finally:
        await engine.dispose()


def test_token_create_refuses_an_unknown_role(tmp_path: Path) -> None:
    result = run_cli(
        "token", "create", "--user", "a", "--team", "t", "--role", "god",
        env=clean_env(PS_DATABASE_URL=f"sqlite:///{tmp_path / 's.db'}"),
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert result.stdout == ""


def test_bad_setting_is_named(tmp_path: Path) -> None:
    result = run_cli("migrate", env=clean_env(PS_WS_MAX_ROOMS="lots"))
    assert result.returncode == 2
    assert "PS_WS_MAX_ROOMS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_migrate_is_idempotent_and_keeps_data(db_url: str) -> None:
    env = clean_env(PS_DATABASE_URL=db_url)
    first = run_cli("migrate", env=env)
    assert first.returncode == 0 and "applied 1" in first.stdout
    token = run_cli("token", "create", "--user", "u", "--team", "t", "--role", "admin", env=env).stdout.strip()
    again = run_cli("migrate", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout
    engine = create_engine(db_url)
    try:
        assert await migrate(engine) == []
        assert await principal_for_token(engine, token) is not None
        async with engine.connect() as conn:
            versions = (await conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version"))).scalars().all()
        assert versions == [n for n, _, _ in MIGRATIONS]
    finally:
        await engine.dispose()


def test_serve_without_redis_url_says_what_to_set(tmp_path: Path) -> None:
    result = run_cli("serve", env=clean_env(PS_DATABASE_URL=f"sqlite:///{tmp_path / 's.db'}"))
    assert result.returncode == 2
    assert "PS_REDIS_URL" in result.stderr


@pytest.mark.slow
def test_dev_runs_a_job_end_to_end_with_nothing_else_running(tmp_path: Path) -> None:
    """The README's run command: embedded Redis, SQLite, replay program, a printed link."""
    port = free_port()
    env = clean_env(PS_REPLAY_SPEED="50", PATH=os.environ["PATH"])
    log = (tmp_path / "dev.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "progress_service.cli", "dev", "--port", str(port)],
        cwd=tmp_path,  # a fresh directory: progress.db and workspace/ are created here
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        token = None
        while time.monotonic() < deadline and token is None:
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()
            match = re.search(rf"{re.escape(base)}/#token=(ps_[A-Za-z0-9_-]+)", (tmp_path / "dev.log").read_text())
            token = match.group(1) if match else None
            time.sleep(0.05)
        assert token, (tmp_path / "dev.log").read_text()
        output = (tmp_path / "dev.log").read_text()
        assert "REPLAY" in output
        assert "?token" not in output

        headers = {"Authorization": f"Bearer {token}"}
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        job = httpx.post(base + "/api/jobs", json={"prompt": "Add a health check"}, headers=headers).json()
        while time.monotonic() < deadline:
            snap = httpx.get(f"{base}/api/jobs/{job['id']}", headers=headers).json()
            if snap["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert snap["status"] == "succeeded", snap
        assert snap["demo"] is True  # decided by the worker that ran it
        events = httpx.get(f"{base}/api/jobs/{job['id']}/events", headers=headers).json()["items"]
        assert {"status", "phase", "step", "todo", "usage", "result"} <= {e["kind"] for e in events}
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert (tmp_path / "progress.db").exists()
    finally:
        # SIGTERM is what service managers send; the embedded Redis must go too.
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    # The embedded redis-server went with it.
    match = re.search(r"embedded Redis at redis://127.0.0.1:(\d+)", (tmp_path / "dev.log").read_text())
    assert match
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=1).close()


def test_help_is_plain_text() -> None:
    """``--help`` of the command and of each subcommand prints no reStructuredText markup."""
    env = clean_env()
    for args in ([], ["dev"], ["serve"], ["worker"], ["token"], ["watch"], ["audit"], ["hooks"]):
        result = run_cli(*args, "--help", env=env)
        assert result.returncode == 0, result.stderr
        assert not re.search(r"``|:(func|class|mod|meth):`", result.stdout), result.stdout
