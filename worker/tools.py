"""What a Claude Code tool call is: its phase and its title.

Tool names are the CLI's (``progress_service.events.CLAUDE_TOOLS``); the
old Grep/Glob/LS/MultiEdit still classify, for recorded output.
"""

from __future__ import annotations

import re
from typing import Any

from progress_service.events import TITLE_MAX_CHARS, Phase, clip


PLANNING_TOOLS = frozenset(
    {"Read", "WebFetch", "WebSearch", "ToolSearch", "ListAgents", "NotebookRead", "Grep", "Glob", "LS"}
)
EDITING_TOOLS = frozenset({"Edit", "MultiEdit", "Write", "NotebookEdit"})
#: Tools that only maintain the to-do list: they never change the phase.
BOOKKEEPING_TOOLS = frozenset({"TodoWrite", "TaskCreate", "TaskUpdate", "TaskList", "TaskGet"})
#: Tools that start a subagent; its steps nest under theirs.
AGENT_TOOLS = frozenset({"Agent", "Task"})

#: Commands that run a test suite (matched as words anywhere in the command,
#: so ``cd app && uv run pytest -q`` counts).
_TEST_RE = re.compile(
    r"(?:^|[\s;&|(])(?:"
    r"pytest|py\.test|tox|nox|jest|vitest|mocha|ava|rspec|phpunit|ctest"
    r"|python[0-9.]*\s+-m\s+(?:pytest|unittest)"
    r"|(?:npm|pnpm|yarn|bun)\s+(?:run\s+)?test"
    r"|go\s+test|cargo\s+(?:test|nextest)|make\s+(?:test|check)|mvn\s+test|gradle\w*\s+test|dotnet\s+test"
    r"|mix\s+test|deno\s+test|bundle\s+exec\s+rspec"
    r")(?=$|[\s;&|)])"
)


def is_test_command(command: str) -> bool:
    """True when a shell command runs a test runner."""
    return bool(_TEST_RE.search(command))


def tool_phase(tool: str, tool_input: dict[str, Any], current: Phase) -> Phase:
    """The phase a tool call puts the job in (see the module docstring)."""
    if tool in PLANNING_TOOLS:
        return "planning"
    if tool in EDITING_TOOLS:
        return "editing"
    if tool == "Bash" and is_test_command(str(tool_input.get("command", ""))):
        return "testing"
    if current in ("queued", "starting", "reviewing", "finishing"):
        return "planning"
    return current


def tool_title(tool: str, tool_input: dict[str, Any]) -> str:
    """A short human title for a tool call: a path, a command, a pattern."""
    for key in ("file_path", "notebook_path", "path"):
        if tool in EDITING_TOOLS | {"Read", "LS", "NotebookRead"} and isinstance(tool_input.get(key), str):
            return clip(tool_input[key], TITLE_MAX_CHARS)
    if tool == "Bash":
        command = str(tool_input.get("command", "")).strip()
        first = command.splitlines()[0] if command else ""
        if first != command:
            first += " …"
        return clip(first, 120)
    if tool == "TaskUpdate" and tool_input.get("taskId") is not None:
        status = tool_input.get("status")
        return clip(f"task #{tool_input['taskId']}" + (f": {status}" if isinstance(status, str) else ""), TITLE_MAX_CHARS)
    for key in ("pattern", "url", "query", "description", "subject", "prompt", "skill"):
        value = tool_input.get(key)
        if isinstance(value, str) and value:
            return clip(value.splitlines()[0], TITLE_MAX_CHARS)
    if tool == "TodoWrite":
        return "update to-do list"
    return clip(tool, TITLE_MAX_CHARS)
