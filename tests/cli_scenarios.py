"""Model scripts for real Claude Code runs: used by the real-CLI tests and to record transcripts.

Each :class:`Scenario` is a small repository, a job spec and what the model
answers turn by turn (``tests/model_server.py``). The CLI then runs real
tools on the repository: Read, Edit and Write change files, Bash runs the
tests, subagents run their own scripts (selected by the marker in the Agent
tool's prompt).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_server import DROP, Reply, ToolUse, reply

CALC = '''def average(values):
    """The mean of a list of numbers."""
    return sum(values) / len(values) + 1
'''
CALC_FIXED = '''def average(values):
    """The mean of a list of numbers."""
    if not values:
        raise ValueError("average of an empty list")
    return sum(values) / len(values)
'''
TEST_CALC = '''import unittest

from calc import average


class AverageTest(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(average([1, 2, 3]), 2)

    def test_empty(self):
        with self.assertRaises(ValueError):
            average([])
'''
README = "# calc\n\nA tiny library with a bug in `average`.\n"


@dataclass
class Scenario:
    """A repository, a job spec and the model's turns (and its subagents')."""

    name: str
    prompt: str
    turns: list[Reply]
    spec: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=lambda: {"README.md": README, "calc.py": CALC, "test_calc.py": TEST_CALC})
    subagents: dict[str, list[Reply]] = field(default_factory=dict)
    final: str = "Done."

    def install(self, server: Any) -> str:
        """Register the scripts on a model server; returns the job's prompt (with its marker)."""
        for name, turns in self.subagents.items():
            server.script(name, turns)
        return f"{self.prompt} {server.script(self.name, self.turns, final=self.final)}"

    def make_repo(self, path: Path) -> Path:
        """The scenario's files in a fresh git repository at ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_text(text)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run([*git, "init", "-q"], cwd=path, check=True)
        subprocess.run([*git, "add", "-A"], cwd=path, check=True)
        subprocess.run([*git, "commit", "-qm", "initial"], cwd=path, check=True)
        return path


def fix_bug(name: str, pace: float = 0.0) -> Scenario:
    """The happy path: to-dos (TaskCreate/TaskUpdate), Read, Edit, Bash tests, a final answer."""
    d = {"delay": pace, "chunk_delay": pace / 20}
    return Scenario(
        name=name,
        prompt="Fix the bug in calc.average and make the tests pass.",
        spec={
            "permissionMode": "acceptEdits",
            "allowedTools": ["TaskCreate", "TaskUpdate", "Bash(python3 -m unittest *)", "Bash(git diff *)"],
        },
        turns=[
            reply(
                "I'll start by planning the work.",
                ToolUse("TaskCreate", {"subject": "Find the bug in average", "description": "Read calc.py", "activeForm": "Reading calc.py"}),
                ToolUse("TaskCreate", {"subject": "Fix average", "description": "Edit calc.py", "activeForm": "Fixing average"}),
                ToolUse("TaskCreate", {"subject": "Run the tests", "description": "python3 -m unittest", "activeForm": "Running tests"}),
                **d,
            ),
            reply(ToolUse("TaskUpdate", {"taskId": "1", "status": "in_progress"}), **d),
            reply(ToolUse("Read", {"file_path": "calc.py"}), **d),
            reply(
                "`average` adds 1 to the mean and fails on an empty list.",
                ToolUse("TaskUpdate", {"taskId": "1", "status": "completed"}),
                ToolUse("TaskUpdate", {"taskId": "2", "status": "in_progress"}),
                **d,
            ),
            reply(ToolUse("Edit", {"file_path": "calc.py", "old_string": CALC, "new_string": CALC_FIXED}), **d),
            reply(
                ToolUse("TaskUpdate", {"taskId": "2", "status": "completed"}),
                ToolUse("TaskUpdate", {"taskId": "3", "status": "in_progress"}),
                **d,
            ),
            reply(ToolUse("Bash", {"command": "python3 -m unittest -v test_calc", "description": "Run the tests"}), **d),
            reply(ToolUse("TaskUpdate", {"taskId": "3", "status": "completed"}), **d),
            reply(ToolUse("Bash", {"command": "git diff --stat", "description": "Show the change"}), **d),
        ],
        final="Fixed `average` in calc.py: it no longer adds 1 and raises ValueError on an empty list. Both tests pass.",
    )


def subagent(name: str, pace: float = 0.0) -> Scenario:
    """A foreground Agent whose subagent runs its own tools, nested under the Agent step."""
    d = {"delay": pace, "chunk_delay": pace / 20}
    child = f"{name}.child"
    return Scenario(
        name=name,
        prompt="Survey the repository with a subagent, then summarize.",
        spec={"permissionMode": "acceptEdits"},
        turns=[
            reply(
                "I'll ask a subagent to look around.",
                ToolUse("Agent", {
                    "description": "Survey the repository",
                    "prompt": f"List the files and read calc.py. [script:{child}]",
                    "subagent_type": "general-purpose",
                    "run_in_background": False,
                }),
                **d,
            ),
        ],
        subagents={child: [
            reply(ToolUse("Bash", {"command": "ls", "description": "List files"}), **d),
            reply(ToolUse("Read", {"file_path": "calc.py"}), **d),
            reply("calc.py defines average(); it adds 1 to the mean.", **d),
        ]},
        final="The subagent found one module, calc.py, whose average() is off by one.",
    )


def todo_write(name: str) -> Scenario:
    """The other to-do tool: TodoWrite (the CLI offers it with CLAUDE_CODE_ENABLE_TASKS=0)."""
    todos = [
        {"content": "Read calc.py", "status": "completed", "activeForm": "Reading calc.py"},
        {"content": "Write notes", "status": "in_progress", "activeForm": "Writing notes"},
    ]
    return Scenario(
        name=name,
        prompt="Take notes on calc.py.",
        spec={"permissionMode": "acceptEdits", "allowedTools": ["TodoWrite"]},
        turns=[
            reply(ToolUse("TodoWrite", {"todos": [{**t, "status": "pending"} for t in todos]})),
            reply(ToolUse("TodoWrite", {"todos": todos})),
            reply(ToolUse("Write", {"file_path": "NOTES.md", "content": "average() is off by one.\n"})),
            reply(ToolUse("TodoWrite", {"todos": [{**t, "status": "completed"} for t in todos]})),
        ],
        final="Notes written to NOTES.md.",
    )


def permission_denied(name: str) -> Scenario:
    """A Bash command the default mode does not allow: the CLI denies it and the agent goes on."""
    return Scenario(
        name=name,
        prompt="Clean the build folder.",
        spec={"permissionMode": "default"},
        turns=[reply(ToolUse("Bash", {"command": "rm -rf build && touch cleaned", "description": "Clean"}))],
        final="I was not allowed to remove the build folder.",
    )


def max_turns(name: str) -> Scenario:
    """More turns than ``maxTurns`` allows: error_max_turns with its ``errors`` text."""
    return Scenario(
        name=name,
        prompt="Keep checking the status.",
        spec={"maxTurns": 2, "permissionMode": "acceptEdits"},
        turns=[reply(ToolUse("Bash", {"command": f"git status --short # {i}", "description": "Status"})) for i in range(4)],
    )


def bypass(name: str) -> Scenario:
    """``bypassPermissions``: refused by the CLI as root unless the worker is a declared sandbox."""
    return Scenario(
        name=name,
        prompt="Write a file without asking.",
        spec={"permissionMode": "bypassPermissions"},
        turns=[reply(ToolUse("Bash", {"command": "touch bypassed && ls", "description": "Touch"}))],
        final="Wrote the file.",
    )


def api_errors(name: str, errors: tuple[int, ...], pace: float = 0.0) -> Scenario:
    """The first request fails with ``errors`` (then, if retries remain, the model answers)."""
    return Scenario(
        name=name,
        prompt="Say hello.",
        spec={"permissionMode": "acceptEdits"},
        turns=[reply("Hello after the retries.", errors=errors, retry_after=0.2, delay=pace)],
        final="Hello after the retries.",
    )


def long_tool(name: str) -> Scenario:
    """A Bash call that runs for a long time (to cancel during a tool)."""
    return Scenario(
        name=name,
        prompt="Wait for the slow build.",
        spec={"permissionMode": "acceptEdits", "allowedTools": ["Bash(python3 *)"]},
        # Not a bare `sleep`: the CLI blocks standalone sleeps.
        turns=[reply(ToolUse("Bash", {"command": "python3 -c 'import time; time.sleep(300)'", "description": "Slow build"}))],
    )


def stalled(name: str, **spec: Any) -> Scenario:
    """The API stalls mid-answer (pings only) for minutes."""
    return Scenario(
        name=name,
        prompt="Think for a long time.",
        spec={"permissionMode": "acceptEdits", **spec},
        turns=[reply("never finished", stall=300)],
    )


__all__ = ["DROP", "Scenario", "fix_bug", "subagent", "todo_write", "permission_denied", "max_turns",
           "bypass", "api_errors", "long_tool", "stalled"]
