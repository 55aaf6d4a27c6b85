"""How the worker starts Claude Code: its command line, its environment, where demo is decided."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from progress_service.events import JobSpec
from progress_service.settings import load_settings
from worker.claude import build_command, child_env, resolve_binary, stdout_copy_path, user_message


def test_the_command_asks_for_stream_events_and_ends_with_the_tools() -> None:
    settings = load_settings(env={}, claude_bin="/opt/claude")
    spec = JobSpec(prompt="fix it", model="sonnet", maxTurns=5, permissionMode="auto", allowedTools=["Bash(git *)", "Edit"])
    command = build_command(settings, spec, "sid")
    # The prompt is the first stdin message (stream-json input), so instructions can follow it.
    assert command.argv == [
        "/opt/claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        "--replay-user-messages", "--include-partial-messages",
        "--session-id", "sid", "--model", "sonnet", "--max-turns", "5", "--permission-mode", "auto",
        "--allowedTools", "Bash(git *)", "Edit",
    ]
    assert "fix it" not in command.argv
    assert command.demo is False


def test_ask_mode_hands_permission_prompts_to_the_worker() -> None:
    settings = load_settings(env={}, claude_bin="/opt/claude")
    argv = build_command(settings, JobSpec(prompt="p", permissionMode="ask"), "sid").argv
    at = argv.index("--permission-mode")
    assert argv[at : at + 4] == ["--permission-mode", "manual", "--permission-prompt-tool", "stdio"]
    assert user_message("hi", "u-1") == b'{"type":"user","message":{"role":"user","content":"hi"},"uuid":"u-1","parent_tool_use_id":null,"session_id":""}\n'


def test_demo_is_decided_by_the_worker_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    argv, demo = resolve_binary(load_settings(env={}))
    assert demo and argv == [sys.executable, "-m", "worker.replay"]


@pytest.mark.parametrize(
    ("mode", "sandbox", "expected"),
    [("bypassPermissions", True, "1"), ("bypassPermissions", False, None), ("acceptEdits", True, None), (None, True, None)],
)
def test_is_sandbox_only_for_bypass_jobs_on_a_declared_sandbox(
    mode: str | None, sandbox: bool, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IS_SANDBOX", raising=False)
    monkeypatch.delenv("DISABLE_AUTOUPDATER", raising=False)
    settings = load_settings(env={}, claude_sandbox=sandbox)
    env = child_env(settings, JobSpec(prompt="p", permissionMode=mode) if mode else JobSpec(prompt="p"))
    assert env.get("IS_SANDBOX") == expected
    assert env["DISABLE_AUTOUPDATER"] == "1"  # the worker runs the version it was deployed with


def test_stdout_copy_is_off_unless_configured(tmp_path: Path) -> None:
    assert stdout_copy_path(load_settings(env={}), "j", 1) is None
    path = stdout_copy_path(load_settings(env={}, claude_stdout_dir=str(tmp_path / "out")), "j", 2)
    assert path == tmp_path / "out" / "j.2.jsonl" and path.parent.is_dir()
