"""The replay program behaves like the CLI: flags, output, exit codes, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--output-format", "stream-json", "--verbose", "--session-id", "11111111-2222-4333-8444-555555555555",
    "--model", "claude-test", "--max-turns", "7", "--permission-mode", "acceptEdits",
    "--some-future-flag", "--allowedTools", "Read", "Bash(git log:*)",
]


def run(prompt: str, *, speed: str = "200", extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_REPLAY")}
    env["PS_REPLAY_SPEED"] = speed
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker.replay", "-p", prompt, *FLAGS],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )


def test_success_prints_stream_json_and_exits_0() -> None:
    proc = run("fix the bug")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["type"] == "system" and lines[0]["subtype"] == "init"
    assert lines[0]["session_id"] == "11111111-2222-4333-8444-555555555555"
    assert lines[0]["model"] == "claude-test" and lines[0]["permissionMode"] == "acceptEdits"
    assert lines[0]["cwd"] == str(ROOT)
    assert lines[-1]["type"] == "result" and lines[-1]["is_error"] is False
    assert all("d" not in line and "j" not in line for line in lines)  # no wrapper leaks
    assert "replay" in proc.stderr  # says it is a demo


@pytest.mark.parametrize(("tag", "subtype"), [("[fail]", "success"), ("[max-turns]", "error_max_turns")])
def test_error_results_exit_1(tag: str, subtype: str) -> None:
    proc = run(f"do it {tag}")
    assert proc.returncode == 1
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["is_error"] is True and last["subtype"] == subtype


def test_env_transcript_wins_over_the_prompt_tag(tmp_path: Path) -> None:
    assert run("[fail]", extra_env={"PS_REPLAY_TRANSCRIPT": "success"}).returncode == 0
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"d":0,"raw":"garbage"}\n{"d":0,"j":{"type":"result","is_error":true}}\n')
    proc = run("x", extra_env={"PS_REPLAY_TRANSCRIPT": str(custom)})
    assert proc.returncode == 1 and proc.stdout.splitlines()[0] == "garbage"


def test_speed_divides_the_delays() -> None:
    started = time.monotonic()
    assert run("x", speed="20").returncode == 0
    assert time.monotonic() - started < 4  # ~25 s recorded, ~1.3 s at 20x


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_it_promptly(sig: signal.Signals, code: int) -> None:
    env = {**os.environ, "PS_REPLAY_SPEED": "1", "PS_REPLAY_TRANSCRIPT": "long"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.replay", "-p", "x", *FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["type"] == "system"  # it is playing
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == code
        assert time.monotonic() - started < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
