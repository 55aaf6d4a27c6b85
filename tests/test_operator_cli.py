"""Operator commands that cannot mislead.

- Commands that read the store refuse a store that does not exist (exit 2,
  naming the URL) instead of creating an empty one and reporting on it.
- The audit actor is the operator who ran the command, the same for every
  command; the token's user is the record's subject.
- ``dev`` keeps one live sign-in token, not one per start.
- A client whose token is revoked is told so: 4403 ``token revoked``, and
  the terminal ``watch`` says "revoked".
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway_helpers import Store, auth, closed_with, connect, join, send, serve
from progress_service.settings import load_settings
from progress_service.store import audit
from progress_service.store.identity import principal_for_token

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = str(Path(sys.executable).with_name("progress-service"))

STORE_READERS = [
    ["token", "list", "--team", "core"],
    ["token", "create", "--user", "ana", "--team", "core", "--role", "admin"],
    ["token", "revoke", "00000000-0000-0000-0000-000000000000"],
    ["audit", "verify"],
    ["audit", "export", "--format", "jsonl"],
]


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    # The session's audit key (conftest) and this test's own witness: no files in the working directory.
    clean.update(PS_AUDIT_KEY_FILE=os.environ["PS_AUDIT_KEY_FILE"], PS_AUDIT_WITNESS=str(cwd / "audit-witness.jsonl"))
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "progress_service.cli", *args], env=clean, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("args", STORE_READERS, ids=lambda a: " ".join(a[:2]))
def test_store_readers_refuse_a_store_that_does_not_exist(args: list[str], tmp_path: Path) -> None:
    """Run from another folder with the default URL: exit 2 naming it, and no progress.db appears."""
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "sqlite+aiosqlite:///progress.db" in result.stderr
    assert str(tmp_path / "progress.db") in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "progress.db").exists()


def test_migrate_still_creates_the_store(tmp_path: Path) -> None:
    assert _cli("migrate", cwd=tmp_path).returncode == 0
    assert (tmp_path / "progress.db").is_file()
    ok = _cli("audit", "verify", cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def test_an_unreachable_store_is_one_line_naming_it(tmp_path: Path) -> None:
    from progress_service.embedded_redis import free_port  # noqa: PLC0415

    url = f"postgresql://ops:s3cret@127.0.0.1:{free_port()}/nope"
    result = _cli("token", "list", "--team", "core", cwd=tmp_path, env={"PS_DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert "127.0.0.1" in result.stderr and "unavailable" in result.stderr


async def test_audit_actor_is_the_operator_for_create_and_revoke(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'ops.db'}"
    env = {"PS_DATABASE_URL": db_url}
    assert _cli("migrate", cwd=tmp_path, env=env).returncode == 0
    created = _cli("token", "create", "--user", "alice", "--team", "core", "--role", "reviewer", cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    listed = _cli("token", "list", "--team", "core", cwd=tmp_path, env=env)
    token_id = listed.stdout.split("\t", 1)[0]
    revoked = _cli("token", "revoke", token_id, cwd=tmp_path, env=env)
    assert revoked.returncode == 0, revoked.stderr
    async with Store(db_url) as store:
        records = await audit.list_records(store.engine, team_id=await audit.team_id_for(store.engine, "core"))
    operator = f"cli:{getpass.getuser()}"
    assert [(r.action, r.actor) for r in records] == [("token.create", operator), ("token.revoke", operator)]
    assert records[0].detail["user"] == "alice" and records[0].detail["tokenId"] == token_id


async def test_dev_keeps_one_live_sign_in_token(tmp_path: Path) -> None:
    from progress_service.cli import _dev_token  # noqa: PLC0415
    from progress_service.revocation import list_tokens  # noqa: PLC0415

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}"
    settings = load_settings(env={}, database_url=db_url)
    first = await _dev_token(settings)
    second = await _dev_token(settings)
    async with Store(db_url) as store:
        assert await principal_for_token(store.engine, first) is None  # the previous start's token is revoked
        assert await principal_for_token(store.engine, second) is not None
        team_id = await audit.team_id_for(store.engine, "dev")
        live = await list_tokens(store.engine, team_id, include_revoked=False)
        assert len(live) == 1
        records = await audit.list_records(store.engine, team_id=team_id)
    assert [r.action for r in records] == ["token.create", "token.revoke", "token.create"]


async def test_a_revoked_client_is_told_it_was_revoked(redis_url: str, tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'rev.db'}"
    settings = load_settings(
        env={}, audit_key_file=os.environ["PS_AUDIT_KEY_FILE"], audit_witness=str(tmp_path / "audit-witness.jsonl"),
        redis_url=redis_url, database_url=db_url, workspace_root=str(tmp_path), log_level="warning",
        queue_name=f"ps:queue:test-rev-{os.getpid()}",
    )
    async with Store(db_url) as store:
        admin = await store.token(role="admin", user="boss")
        viewer, viewer_id = await store.token_with_id(role="viewer", user="vic")
        job_id = await store.job()
    async with serve(settings) as (base, app):
        gateway = app.state.services.gateway
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        env.update(PS_URL=base, PS_TOKEN=viewer)
        watch = subprocess.Popen([CONSOLE, "watch", job_id], env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            async with connect(base) as ws:
                await auth(ws, viewer)
                await join(ws, job_id)
                with anyio.fail_after(20):  # the terminal watcher is connected too
                    while len([s for s in gateway.sessions.values() if s.rooms]) < 2:
                        assert watch.poll() is None, watch.communicate()
                        await anyio.sleep(0.05)
                async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as http:
                    assert (await http.delete(f"/api/tokens/{viewer_id}")).status_code in (200, 204)
                assert await closed_with(ws, timeout=10) == (4403, "token revoked")
            out, err = await anyio.to_thread.run_sync(lambda: watch.communicate(timeout=20))
            async with connect(base) as again:  # coming back with it: told the same
                await send(again, type="auth", token=viewer)
                assert await closed_with(again, timeout=10) == (4403, "token revoked")
            later = await anyio.to_thread.run_sync(
                lambda: subprocess.run([CONSOLE, "watch", job_id], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=30)
            )
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
    assert watch.returncode == 2, (out, err)
    assert "revoked" in err and "Traceback" not in err, err
    assert later.returncode == 2 and "revoked" in later.stderr, later.stderr


@pytest.mark.postgres
def test_a_missing_postgres_database_is_named_not_created(postgres_admin_url: str, tmp_path: Path) -> None:
    url = postgres_admin_url.rsplit("/", 1)[0] + f"/ps_missing_{os.getpid()}"
    result = _cli("audit", "verify", cwd=tmp_path, env={"PS_DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert f"ps_missing_{os.getpid()}" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
