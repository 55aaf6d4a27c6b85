"""``progress-service hooks install|uninstall``: merging with existing settings, removing exactly ours."""

from __future__ import annotations

import json
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


def run(*args: str, cwd: Path, env_home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_home), "PS_HOOK_TOKEN": "ps_secret-that-must-not-be-written"}
    return subprocess.run(
        [sys.executable, "-m", "progress_service.cli", "hooks", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_install_merges_and_uninstall_removes_exactly_what_it_added(tmp_path: Path) -> None:
    project = tmp_path / "project"
    settings = project / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(EXISTING, indent=2))

    done = run("install", "--project", str(project), "--url", "http://ps.example:8000/", "--host-label", "laptop-7", cwd=tmp_path, env_home=tmp_path)
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
