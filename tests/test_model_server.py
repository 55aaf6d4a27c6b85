"""The scripted model server against the real CLI: the contract other real-CLI tests build on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from model_server import ToolUse, reply


def run_cli(claude_bin: str, env: dict[str, str], cwd: Path, prompt: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run(
        [claude_bin, "-p", prompt, "--output-format", "stream-json", "--verbose", *args],
        cwd=cwd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_cli_runs_a_scripted_conversation(claude_bin: str, model_server: Any, claude_env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    marker = model_server.script("basic", [
        reply("Looking.", ToolUse("Bash", {"command": "echo scripted-$((6*7))", "description": "echo"})),
        reply(ToolUse("Write", {"file_path": str(work / "notes.txt"), "content": "hello\n"})),
        reply("Wrote notes.txt."),
    ])
    code, lines = run_cli(claude_bin, claude_env, work, f"write notes {marker}", "--permission-mode", "acceptEdits")
    assert code == 0, lines[-1:]
    assert (work / "notes.txt").read_text() == "hello\n"
    results = [b for ln in lines if ln["type"] == "user" for b in ln["message"]["content"] if b.get("type") == "tool_result"]
    assert "scripted-42" in results[0]["content"]
    final = lines[-1]
    assert final["type"] == "result" and final["subtype"] == "success" and final["result"] == "Wrote notes.txt."
    calls = model_server.messages_for("basic")
    assert [r.turn for r in calls] == [0, 1, 2]
    assert all("Bash" in r.tools and r.body["stream"] for r in calls)
    # The CLI's totals are the sum of what the server streamed.
    assert final["usage"]["output_tokens"] > 3
