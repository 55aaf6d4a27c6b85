"""docker-compose.yml runs only commands and settings this project really has.

No Docker engine runs here, so the file is checked against the code instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from progress_service.cli import build_parser
from progress_service.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_services_have_the_expected_shape() -> None:
    services = _compose()["services"]
    assert {"redis", "postgres", "app", "worker"} <= set(services)
    for name in ("redis", "postgres", "app"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]


def test_every_command_is_a_real_subcommand() -> None:
    parser = build_parser()
    commands = _subcommands(parser)
    for name, service in _compose()["services"].items():
        cmd = service.get("command")
        if not cmd or cmd[0] != "progress-service":
            continue
        assert cmd[1] in commands, f"service {name}: unknown subcommand {cmd[1]!r}"
        # argparse exits on unknown flags; a clean parse proves the flags exist.
        args = parser.parse_args(cmd[1:])
        assert args.command == cmd[1]


def test_every_ps_variable_is_a_setting() -> None:
    fields = {PREFIX + f.upper() for f in Settings.__struct_fields__}
    for name, service in _compose()["services"].items():
        for var in (service.get("environment") or {}):
            if var.startswith(PREFIX):
                assert var in fields, f"service {name}: {var} is not a setting of the project"


def test_app_and_worker_share_redis_store_and_workspace() -> None:
    services = _compose()["services"]
    app_env, worker_env = services["app"]["environment"], services["worker"]["environment"]
    for var in ("PS_REDIS_URL", "PS_DATABASE_URL", "PS_WORKSPACE_ROOT"):
        assert app_env[var] == worker_env[var], var
    assert app_env["PS_DATABASE_URL"].startswith("postgresql")


def test_images_build_from_this_repo() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("progress_service", "worker", "web", "pyproject.toml"):
        assert path in dockerfile
        assert (ROOT / path).exists()


def test_long_running_services_restart_after_a_crash() -> None:
    services = _compose()["services"]
    for name in ("redis", "postgres", "app", "worker"):
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure"), name
    # migrate is one-shot: restarting it would loop.
    assert services["migrate"].get("restart", "no") == "no"


# --------------------------------------------------------------------------
# The image runs real Claude Code jobs
# --------------------------------------------------------------------------


def _final_stage(dockerfile: str) -> list[str]:
    """The instructions of the last stage (what the running image is), one per logical line."""
    text = dockerfile.replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def test_image_has_node_the_pinned_cli_a_user_init_and_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    version = (ROOT / ".claude-code-version").read_text().strip()
    assert version.count(".") == 2 and version.replace(".", "").isdigit()  # an exact pin
    # The pin is read from its one home, installed with npm on Node.js >= 22.
    assert "COPY .claude-code-version" in dockerfile
    assert '"@anthropic-ai/claude-code@$(cat /tmp/claude-code-version)"' in dockerfile
    assert "FROM node:22" in dockerfile
    final = _final_stage(dockerfile)
    copies = " ".join(ln for ln in final if ln.startswith("COPY --from="))
    assert "/usr/local/bin/node" in copies and "@anthropic-ai/claude-code" in copies
    assert any("/usr/local/bin/claude" in ln and "claude --version" in ln for ln in final)
    # Not root when it runs: the last USER is a named non-root user.
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("useradd" in ln and users[-1] in ln for ln in final)
    # tini reaps zombies as PID 1.
    assert 'ENTRYPOINT ["tini", "--"]' in final
    assert any(ln.startswith("RUN ") and "tini" in ln for ln in final)
    (health,) = [ln for ln in final if ln.startswith("HEALTHCHECK ")]
    assert '"progress_service.healthcheck", "app"' in health


def test_workers_get_credentials_from_the_environment_only() -> None:
    worker = _compose()["services"]["worker"]
    env = worker["environment"]
    for var in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        # Declared without a value: compose passes it through from the shell.
        assert var in env and env[var] is None, var
    assert worker.get("init") is True
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "progress_service.healthcheck", "worker"]
    for name, service in _compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            assert not (isinstance(value, str) and value.startswith(("sk-ant-", "sk-"))), f"{name}: {var} holds a key"
    readme = (ROOT / "README.md").read_text()
    team = readme[readme.index("## Running it for a team"):]
    for var in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL", "PS_CLAUDE_SANDBOX"):
        assert var in team, var
    assert "/api/jobs" in team and "docker compose up" in team


def test_healthchecks_run(redis_url: str, claude_bin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from progress_service import healthcheck  # noqa: PLC0415

    monkeypatch.setenv("PS_REDIS_URL", redis_url)
    monkeypatch.setenv("PS_CLAUDE_BIN", claude_bin)
    assert healthcheck.main(["worker"]) == 0
    version = (ROOT / ".claude-code-version").read_text().strip()
    assert capsys.readouterr().out.strip() == f"worker ready: redis answers, {version} (Claude Code)"
    # A worker that would fall back to the replay demo is not healthy.
    monkeypatch.delenv("PS_CLAUDE_BIN")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert healthcheck.main(["worker"]) == 1
    assert "jobs would be demos" in capsys.readouterr().out
    # Nothing listens on this port: the app check fails in one line.
    monkeypatch.setenv("PS_PORT", "1")
    assert healthcheck.main(["app"]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: ")
    assert healthcheck.main([]) == 2
