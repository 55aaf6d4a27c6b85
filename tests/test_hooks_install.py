"""``progress-service hooks install|uninstall``: merging with existing settings, removing exactly ours."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from progress_service.hooks.install import EVENTS, HOOKS_PATH, TOKEN_ENV

EXISTING = {
    "permissions": {"allow": ["Bash(npm test)"]},
    "hooks": {
        "PostToolUse": [
            {"matcher": "Write|Edit", "hooks": [{"type": "command", "command": "npx prettier --write ."}]},
        ],
        "Stop": [{"hooks": [{"type": "command", "command": "say done"}]}],
    },
    "model": "sonnet",
}


def run(*args: str, cwd: Path, env_home: Path, subprocess_: bool = False) -> subprocess.CompletedProcess[str]:
    """``progress-service hooks ARGS``: as a real process, or (faster) through ``cli.main`` in this one."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_home), "PS_HOOK_TOKEN": "ps_secret-that-must-not-be-written"}
    if subprocess_:
        return subprocess.run(
            [sys.executable, "-m", "progress_service.cli", "hooks", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
    from progress_service.cli import main  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (*env, "CLAUDE_CONFIG_DIR")}
    os.environ.pop("CLAUDE_CONFIG_DIR", None)  # --user must land in the scratch HOME, never a real config
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["hooks", *args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_install_merges_and_uninstall_removes_exactly_what_it_added(tmp_path: Path) -> None:
    project = tmp_path / "project"
    settings = project / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(EXISTING, indent=2))

    done = run(
        "install", "--project", str(project), "--url", "http://ps.example:8000/", "--host-label", "laptop-7",
        cwd=tmp_path, env_home=tmp_path, subprocess_=True,
    )
    assert done.returncode == 0, done.stderr
    text = settings.read_text()
    assert "ps_secret" not in text  # the token stays in the environment
    installed = json.loads(text)
    assert installed["permissions"] == EXISTING["permissions"] and installed["model"] == "sonnet"
    assert set(EVENTS) <= set(installed["hooks"])
    # The user's own hooks stay first and untouched.
    assert installed["hooks"]["PostToolUse"][0] == EXISTING["hooks"]["PostToolUse"][0]
    assert installed["hooks"]["Stop"][0] == EXISTING["hooks"]["Stop"][0]
    ours = installed["hooks"]["PreToolUse"][-1]["hooks"][0]
    assert ours == {
        "type": "http",
        "url": "http://ps.example:8000" + HOOKS_PATH,
        "timeout": 5,
        "headers": {"Authorization": f"Bearer ${TOKEN_ENV}", "X-PS-Host": "laptop-7"},
        "allowedEnvVars": [TOKEN_ENV],
    }

    # Installing again replaces ours instead of adding a second copy.
    again = run("install", "--project", str(project), "--url", "http://other:9000", cwd=tmp_path, env_home=tmp_path)
    assert again.returncode == 0, again.stderr
    twice = json.loads(settings.read_text())
    assert len(twice["hooks"]["PostToolUse"]) == 2
    assert twice["hooks"]["PostToolUse"][-1]["hooks"][0]["url"] == "http://other:9000" + HOOKS_PATH

    removed = run("uninstall", "--project", str(project), cwd=tmp_path, env_home=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(settings.read_text()) == EXISTING
    assert "no progress-service hooks" in run("uninstall", "--project", str(project), cwd=tmp_path, env_home=tmp_path).stdout


def test_user_install_print_and_a_file_of_only_ours(tmp_path: Path) -> None:
    printed = run("install", "--print", "--url", "http://127.0.0.1:8010", cwd=tmp_path, env_home=tmp_path)
    assert printed.returncode == 0, printed.stderr
    block = json.loads(printed.stdout)
    assert list(block) == ["hooks"] and set(block["hooks"]) == set(EVENTS)
    assert not (tmp_path / ".claude").exists()

    user_settings = tmp_path / ".claude" / "settings.json"
    assert run("install", "--user", cwd=tmp_path, env_home=tmp_path).returncode == 0
    assert json.loads(user_settings.read_text())["hooks"]["SessionEnd"][0]["hooks"][0]["url"] == "http://127.0.0.1:8000" + HOOKS_PATH
    assert run("uninstall", "--user", cwd=tmp_path, env_home=tmp_path).returncode == 0
    assert not user_settings.exists()  # it held nothing else

    bad = tmp_path / "bad" / ".claude" / "settings.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"hooks": []}')
    refused = run("install", "--project", str(tmp_path / "bad"), cwd=tmp_path, env_home=tmp_path)
    assert refused.returncode == 2 and "not an object" in refused.stderr
    assert bad.read_text() == '{"hooks": []}'


async def test_migration_adds_job_kind_and_keeps_rows(db_url: str) -> None:
    """A store from before the hooks (schema v3) gets kind/source/host; its jobs stay, as worker jobs."""
    import sqlalchemy as sa  # noqa: PLC0415

    from progress_service.events import JobSpec  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.identity import ensure_team, ensure_user  # noqa: PLC0415
    from progress_service.store.jobs import create_job, get_job, jobs_in_status, update_job  # noqa: PLC0415
    from progress_service.store.migrations import MIGRATIONS, migrate  # noqa: PLC0415

    number = next(n for n, name, _ in MIGRATIONS if name == "job kind, source and host")
    engine = create_engine(db_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:  # back to v3: the columns did not exist yet
            for column in ("kind", "source", "host"):
                await conn.execute(sa.text(f"ALTER TABLE jobs DROP COLUMN {column}"))
            # (later migrations, if any, run again too: each is written to be re-runnable)
            await conn.execute(sa.text("DELETE FROM schema_version WHERE version >= :n"), {"n": number})
            team, user = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"
            await conn.execute(sa.text("INSERT INTO teams (id, name, created_at) VALUES (:i, 'old', 1)"), {"i": team})
            await conn.execute(sa.text("INSERT INTO users (id, name, created_at) VALUES (:i, 'old', 1)"), {"i": user})
            await conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, team_id, user_id, spec, status, phase, created_at, attempt, demo) "
                    "VALUES ('old-job', :t, :u, '{\"prompt\":\"old\"}', 'running', 'editing', 1, 1, false)"
                ),
                {"t": team, "u": user},
            )
        assert f"{number}: job kind, source and host" in await migrate(engine)
        old = await get_job(engine, "old-job")
        assert old is not None and old.kind == "job" and old.spec.prompt == "old" and old.status == "running"
        # A session job is never taken for a worker job whose lease was lost.
        await create_job(
            engine, job_id="cc-x", team_id=await ensure_team(engine, "t"), user_id=await ensure_user(engine, "u"),
            spec=JobSpec(prompt="s"), created_at=2, demo=False, kind="session", source="hook", host="laptop", status="running",
        )
        await update_job(engine, "cc-x", status="running")
        assert [r.id for r in await jobs_in_status(engine, ["running"])] == ["old-job"]
        record = await get_job(engine, "cc-x")
        assert record is not None and record.host == "laptop"
    finally:
        await engine.dispose()
