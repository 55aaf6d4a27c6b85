"""Writes the replay transcripts (``python -m worker.transcripts.generate``).

Each transcript line is a wrapper ``{"d": <ms to wait before it>, "j":
<one stream-json object>}`` (or ``"raw": <text>`` to print a line verbatim);
the replay program prints ``j`` exactly, so what the worker reads is plain
stream-json. The objects follow the documented format (DESIGN.md, "Claude
Code facts"); ids, costs and timings are made up but plausible. The files are
committed; this script is how they were made and how to change them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MODEL = "claude-sonnet-4-5-20250929"
SESSION = "00000000-0000-4000-8000-000000000000"  # replaced by --session-id


class Script:
    """Builds one transcript: assistant turns, tool calls and their results."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.turn = 0
        self.tool = 0
        self.in_tokens = 0
        self.out_tokens = 0

    def add(self, delay: int, obj: dict[str, Any]) -> None:
        self.lines.append({"d": delay, "j": obj})

    def init(self, tools: list[str]) -> None:
        self.add(
            300,
            {
                "type": "system",
                "subtype": "init",
                "cwd": "/workspace",
                "session_id": SESSION,
                "tools": tools,
                "mcp_servers": [],
                "model": MODEL,
                "permissionMode": "default",
                "slash_commands": ["compact", "review"],
                "apiKeySource": "none",
                "claude_code_version": "2.0.14",
                "output_style": "default",
                "agents": ["general-purpose"],
                "uuid": "9f0c1a52-0000-4000-8000-000000000001",
            },
        )

    def _assistant(self, delay: int, block: dict[str, Any], msg_id: str, stop: str | None = None) -> None:
        self.add(
            delay,
            {
                "type": "assistant",
                "message": {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [block],
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 12,
                        "cache_creation_input_tokens": 400 if self.turn == 1 else 0,
                        "cache_read_input_tokens": 9000 + 350 * self.turn,
                        "output_tokens": 40 + 7 * self.turn,
                        "service_tier": "standard",
                    },
                },
                "parent_tool_use_id": None,
                "session_id": SESSION,
                "uuid": f"a{self.turn:07d}-0000-4000-8000-{len(self.lines):012d}",
            },
        )

    def turn_start(self) -> str:
        self.turn += 1
        return f"msg_01Replay{self.turn:06d}"

    def text(self, delay: int, text: str, *, final: bool = False) -> None:
        msg = self.turn_start()
        self._assistant(delay, {"type": "text", "text": text}, msg, "end_turn" if final else None)

    def thinking(self, delay: int, text: str) -> str:
        msg = self.turn_start()
        self._assistant(delay, {"type": "thinking", "thinking": text, "signature": "c2lnbmF0dXJl"}, msg)
        return msg

    def call(
        self,
        name: str,
        tool_input: dict[str, Any],
        result: str,
        *,
        delay: int = 600,
        run_ms: int = 300,
        is_error: bool = False,
        say: str | None = None,
    ) -> None:
        """One assistant turn (optional text, then a tool_use) and its tool_result."""
        msg = self.turn_start()
        if say:
            self._assistant(delay, {"type": "text", "text": say}, msg)
            delay = 40
        self.tool += 1
        tool_id = f"toolu_01Replay{self.tool:010d}"
        self._assistant(delay, {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}, msg)
        self.add(
            run_ms,
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {"tool_use_id": tool_id, "type": "tool_result", "content": result, "is_error": is_error}
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": SESSION,
                "uuid": f"u{self.tool:07d}-0000-4000-8000-{len(self.lines):012d}",
            },
        )

    def result(self, *, subtype: str, is_error: bool, text: str | None, cost: float, duration_ms: int) -> None:
        obj: dict[str, Any] = {
            "type": "result",
            "subtype": subtype,
            "is_error": is_error,
            "duration_ms": duration_ms,
            "duration_api_ms": int(duration_ms * 0.8),
            "num_turns": self.turn,
            "session_id": SESSION,
            "total_cost_usd": cost,
            "usage": {
                "input_tokens": 12 * self.turn,
                "cache_creation_input_tokens": 400,
                "cache_read_input_tokens": sum(9000 + 350 * t for t in range(1, self.turn + 1)),
                "output_tokens": sum(40 + 7 * t for t in range(1, self.turn + 1)),
                "server_tool_use": {"web_search_requests": 0},
                "service_tier": "standard",
            },
            "modelUsage": {MODEL: {"inputTokens": 12 * self.turn, "costUSD": cost}},
            "permission_denials": [],
            "uuid": "r0000000-0000-4000-8000-000000000001",
        }
        if text is not None:
            obj["result"] = text
        self.add(200, obj)

    def write(self, name: str, *, pace: float = 1.0) -> None:
        """Write the transcript; ``pace`` stretches every delay."""
        path = HERE / f"{name}.jsonl"
        with path.open("w") as fh:
            for line in self.lines:
                line = {**line, "d": int(line["d"] * pace)}
                fh.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")


TOOLS = ["Task", "Bash", "Glob", "Grep", "LS", "Read", "Edit", "MultiEdit", "Write", "TodoWrite", "WebFetch"]


def todos(*states: str) -> dict[str, Any]:
    items = [
        ("Fix the rounding bug in src/calc.py", "Fixing the rounding bug"),
        ("Add a regression test in tests/test_calc.py", "Adding a regression test"),
        ("Run the test suite", "Running the test suite"),
    ]
    return {
        "todos": [
            {"content": c, "status": s, "activeForm": a} for (c, a), s in zip(items, states, strict=True)
        ]
    }


def success() -> Script:
    s = Script()
    s.init(TOOLS)
    s.text(900, "I'll look at the project layout first, then fix the rounding bug and cover it with a test.")
    s.call("Glob", {"pattern": "**/*.py"}, "src/calc.py\ntests/test_calc.py", delay=700)
    s.call("Read", {"file_path": "src/calc.py"}, "1\tdef average(xs):\n2\t    return round(sum(xs) / len(xs))\n")
    s.call("Read", {"file_path": "tests/test_calc.py"}, "1\tfrom calc import average\n")
    # An event type newer than this service: must be ignored.
    s.add(50, {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed", "resetsAt": 1760000000}})
    s.call("TodoWrite", todos("in_progress", "pending", "pending"), "Todos have been modified successfully.")
    s.call(
        "Edit",
        {
            "file_path": "src/calc.py",
            "old_string": "    return round(sum(xs) / len(xs))",
            "new_string": "    if not xs:\n        raise ValueError('empty')\n    return sum(xs) / len(xs)",
        },
        "The file src/calc.py has been updated.",
        say="The average is rounded to an integer; it should return the exact mean and refuse empty input.",
        run_ms=250,
    )
    s.call("TodoWrite", todos("completed", "in_progress", "pending"), "Todos have been modified successfully.")
    s.call(
        "Edit",
        {
            "file_path": "tests/test_calc.py",
            "old_string": "from calc import average\n",
            "new_string": "from calc import average\n\n\ndef test_average_is_exact():\n    assert average([1, 2]) == 1.5\n",
        },
        "The file tests/test_calc.py has been updated.",
        run_ms=250,
    )
    s.call("TodoWrite", todos("completed", "completed", "in_progress"), "Todos have been modified successfully.")
    s.call(
        "Bash",
        {"command": "python -m pytest -q tests", "description": "Run the test suite"},
        "..\n2 passed in 0.03s",
        run_ms=1600,
    )
    s.call("TodoWrite", todos("completed", "completed", "completed"), "Todos have been modified successfully.")
    s.text(
        800,
        "Fixed `average` in src/calc.py: it now returns the exact mean and raises ValueError on empty input. "
        "Added test_average_is_exact; the suite passes (2 passed).",
        final=True,
    )
    # An unknown field on a known type: must be ignored too.
    s.lines[-1]["j"]["future_field"] = {"nested": [1, 2, 3]}
    s.result(
        subtype="success",
        is_error=False,
        text="Fixed `average` in src/calc.py (exact mean, ValueError on empty input) and added a regression "
        "test; 2 tests pass.",
        cost=0.0421,
        duration_ms=18250,
    )
    return s


def fail() -> Script:
    s = Script()
    s.init(TOOLS)
    s.text(900, "Let me check the repository state before changing anything.")
    s.call("Read", {"file_path": "README.md"}, "# demo\n")
    s.call(
        "Bash",
        {"command": "git status --porcelain", "description": "Show working tree status"},
        "fatal: not a git repository (or any of the parent directories): .git",
        is_error=True,
    )
    # The CLI reports some failures with subtype "success": is_error decides.
    s.result(
        subtype="success",
        is_error=True,
        text="API Error: 529 {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}",
        cost=0.0093,
        duration_ms=5400,
    )
    return s


def max_turns() -> Script:
    s = Script()
    s.init(TOOLS)
    s.call("Grep", {"pattern": "TODO", "path": "."}, "src/app.py:12: # TODO: handle retries", delay=800)
    s.call("Read", {"file_path": "src/app.py"}, "12\t# TODO: handle retries\n")
    s.call(
        "Edit",
        {"file_path": "src/app.py", "old_string": "# TODO: handle retries", "new_string": "retries = 3"},
        "The file src/app.py has been updated.",
    )
    s.call("Bash", {"command": "npm test"}, "1 failing", is_error=True, run_ms=900)
    s.result(subtype="error_max_turns", is_error=True, text=None, cost=0.0188, duration_ms=9100)
    return s


def long(steps: int = 300) -> Script:
    """Hundreds of tool calls with a to-do list that advances: for benchmarks."""
    s = Script()
    s.init(TOOLS)
    n_todos = 10
    names = [f"Refactor module m{i:02d}" for i in range(n_todos)]

    def todo_input(done: int) -> dict[str, Any]:
        return {
            "todos": [
                {
                    "content": name,
                    "status": "completed" if i < done else ("in_progress" if i == done else "pending"),
                    "activeForm": name.replace("Refactor", "Refactoring"),
                }
                for i, name in enumerate(names)
            ]
        }

    s.call("TodoWrite", todo_input(0), "Todos have been modified successfully.", delay=300, run_ms=50)
    per_todo = steps // n_todos
    for t in range(n_todos):
        for k in range(per_todo - 1):
            path = f"src/m{t:02d}/f{k:03d}.py"
            kind = k % 3
            if kind == 0:
                s.call("Read", {"file_path": path}, f"1\t# module {t} file {k}\n", delay=60, run_ms=40)
            elif kind == 1:
                s.call(
                    "Edit",
                    {"file_path": path, "old_string": "old", "new_string": "new"},
                    f"The file {path} has been updated.",
                    delay=80,
                    run_ms=40,
                )
            else:
                s.call("Bash", {"command": f"pytest -q tests/m{t:02d}"}, "3 passed", delay=60, run_ms=120)
        s.call("TodoWrite", todo_input(t + 1), "Todos have been modified successfully.", delay=60, run_ms=30)
    s.text(300, f"Refactored {n_todos} modules; all tests pass.", final=True)
    s.result(subtype="success", is_error=False, text=f"Refactored {n_todos} modules.", cost=1.734, duration_ms=600000)
    return s


def main() -> None:
    success().write("success", pace=2.0)  # ~25 s, like a small real job
    fail().write("fail")
    max_turns().write("max-turns")
    long().write("long")


if __name__ == "__main__":
    main()
