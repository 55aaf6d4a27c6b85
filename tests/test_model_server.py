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


def test_endpoints_errors_and_recording_without_the_cli(model_server: Any) -> None:
    import httpx  # noqa: PLC0415

    from model_server import DROP  # noqa: PLC0415

    marker = model_server.script("raw", [reply("hi", errors=(529, DROP), retry_after=0.25), reply("never")])
    url = model_server.url
    assert httpx.head(url + "/api/hello").status_code == 200
    assert httpx.head(url + "/").status_code == 200
    body = {"model": "m", "stream": True, "tools": [{"name": "Bash"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": f"go {marker}"}]}]}
    first = httpx.post(url + "/v1/messages?beta=true", json=body)
    assert first.status_code == 529 and first.json()["error"]["type"] == "overloaded_error"
    assert first.headers["retry-after-ms"] == "250"
    try:
        httpx.post(url + "/v1/messages", json=body)
        raise AssertionError("a DROP answer must close the connection unanswered")
    except httpx.HTTPError:
        pass
    with httpx.stream("POST", url + "/v1/messages", json=body) as resp:
        events = [ln.split(": ", 1)[1] for ln in resp.iter_lines() if ln.startswith("event: ")]
    assert events == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    whole = httpx.post(url + "/v1/messages", json={**body, "stream": False}).json()
    # The same turn again (no tool result yet): its reply, as one JSON message.
    assert whole["content"] == [{"type": "text", "text": "hi"}] and whole["stop_reason"] == "end_turn"
    aux = httpx.post(url + "/v1/messages", json={"model": "m", "stream": False, "messages": body["messages"]}).json()
    assert aux["content"][0]["text"] == "OK."  # no tools: an auxiliary request
    assert httpx.post(url + "/v1/messages/count_tokens", json=body).json()["input_tokens"] > 0
    assert httpx.post(url + "/v1/other", json={}).status_code == 404
    assert [r.status for r in model_server.messages_for("raw")] == [529, DROP, 200, 200]
