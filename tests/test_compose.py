"""docker-compose.yml runs only commands and settings this project really has.

No Docker engine runs here, so the file is checked against the code instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
