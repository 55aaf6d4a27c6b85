"""What a step shows when opened: a tool call's input and its result, bounded.

:func:`step_input` turns a ``tool_use`` input into a :class:`StepInput`
(the command, the file and a diff for edits, the pattern); :func:`step_output`
turns a ``tool_result`` content into the text, exit code and error line of
:class:`StepData`. Both clip to the bounds in ``progress_service.events`` so
one huge file read cannot bloat the event log.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

import msgspec

from progress_service.events import STEP_INPUT_MAX_CHARS, STEP_OUTPUT_MAX_CHARS, StepInput, clip

#: Claude Code starts a failed Bash result with "Exit code N" (sometimes
#: after "Error: ").
_EXIT_RE = re.compile(r"^(?:Error:\s*)?Exit code (\d{1,3})\b")
_PATH_KEYS = ("file_path", "notebook_path", "path")
_TEXT_KEYS = ("url", "query", "prompt", "description", "subject")
#: Input keys already shown by a dedicated field (not repeated in ``text``).
_SHOWN = {"command", "pattern", "old_string", "new_string", "content", "edits", *_PATH_KEYS}


def _s(value: Any) -> str | None:
    return clip(value, STEP_INPUT_MAX_CHARS) if isinstance(value, str) and value else None


def _diff(path: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}", n=2
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def edit_diff(tool: str, tool_input: dict[str, Any]) -> str | None:
    """A unified diff of what Edit/MultiEdit/Write change, or None for other tools."""
    path = str(tool_input.get("file_path") or tool_input.get("notebook_path") or "file")
    if tool == "Edit":
        return _diff(path, str(tool_input.get("old_string", "")), str(tool_input.get("new_string", "")))
    if tool == "MultiEdit" and isinstance(tool_input.get("edits"), list):
        parts = [
            _diff(path, str(e.get("old_string", "")), str(e.get("new_string", "")))
            for e in tool_input["edits"]
            if isinstance(e, dict)
        ]
        return "".join(parts)
    if tool == "Write" and isinstance(tool_input.get("content"), str):
        return _diff(path, "", tool_input["content"])
    return None


def step_input(tool: str, tool_input: dict[str, Any]) -> StepInput | None:
    """The parts of a tool call's input worth showing, each clipped."""
    path = next((tool_input[k] for k in _PATH_KEYS if isinstance(tool_input.get(k), str)), None)
    diff = edit_diff(tool, tool_input)
    text = next((tool_input[k] for k in _TEXT_KEYS if isinstance(tool_input.get(k), str) and tool_input[k]), None)
    if text is None:
        rest = {k: v for k, v in tool_input.items() if k not in _SHOWN}
        if rest:
            text = json.dumps(rest, ensure_ascii=False, indent=1, default=str)
    detail = StepInput(
        command=_s(tool_input.get("command")),
        path=_s(path),
        diff=_s(diff),
        pattern=_s(tool_input.get("pattern")),
        text=_s(text),
    )
    return detail if detail != StepInput() else None


def result_text(content: Any) -> str:
    """The text of a ``tool_result`` content: a string or a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, dict) and block.get("type") == "image":
                parts.append("[image]")
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(parts)
    if content is None:
        return ""
    return msgspec.json.encode(content).decode()


class StepOutput(msgspec.Struct, kw_only=True):
    """The output fields of a finished :class:`StepData`."""

    output: str | None
    outputChars: int | None
    exitCode: int | None
    error: str | None


def step_output(tool: str, content: Any, is_error: bool) -> StepOutput:
    """Clip a tool result and read its exit code (Bash) and error line."""
    text = result_text(content)
    exit_code: int | None = None
    match = _EXIT_RE.match(text)
    if match:
        exit_code = int(match.group(1))
    elif tool == "Bash" and not is_error:
        exit_code = 0
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return StepOutput(
        output=clip(text, STEP_OUTPUT_MAX_CHARS) if text else None,
        outputChars=len(text) if len(text) > STEP_OUTPUT_MAX_CHARS else None,
        exitCode=exit_code,
        error=clip(first or "error", 300) if is_error else None,
    )
