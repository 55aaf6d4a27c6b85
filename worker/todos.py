"""The agent's to-do list, as its to-do tools maintain it.

Two tool families write it: TaskCreate/TaskUpdate (the CLI's default) and
TodoWrite (whole list at once; the CLI offers it with
``CLAUDE_CODE_ENABLE_TASKS=0``). Both end up as one ordered list of items.
"""

from __future__ import annotations

import re
from typing import Any

from progress_service.events import TITLE_MAX_CHARS, TodoData, TodoItem, clip, todo_state

_TASK_ID_RE = re.compile(r"#\s*([A-Za-z0-9_-]+)")


class TodoList:
    """Ordered (task id, item) pairs, updated from tool calls."""

    def __init__(self) -> None:
        self._items: list[tuple[str, TodoItem]] = []
        self._next_task = 1

    def apply(self, tool: str, tool_input: dict[str, Any]) -> tuple[bool, str | None]:
        """Apply one tool call: (whether the list changed, the id guessed for a TaskCreate)."""
        if tool == "TodoWrite" and isinstance(tool_input.get("todos"), list):
            self._items = []
            for n, raw in enumerate(tool_input["todos"], 1):
                if isinstance(raw, dict):
                    text = str(raw.get("content") or raw.get("activeForm") or "")
                    state = todo_state(raw.get("status"))
                    self._items.append((str(raw.get("id", n)), TodoItem(text=clip(text, TITLE_MAX_CHARS), state=state)))
            return True, None
        if tool == "TaskCreate":
            # The tool assigns the id; the CLI numbers tasks 1, 2, ... in
            # creation order, and the result ("Task #3 created") corrects
            # the guess if it differs (see created()).
            subject = str(tool_input.get("subject") or tool_input.get("description") or "")
            task_id = str(self._next_task)
            self._next_task += 1
            self._items.append((task_id, TodoItem(text=clip(subject, TITLE_MAX_CHARS), state="pending")))
            return True, task_id
        if tool == "TaskUpdate":
            task_id = str(tool_input.get("taskId", tool_input.get("id", "")))
            status: object = tool_input.get("status")
            new_subject: object = tool_input.get("subject")
            for i, (tid, item) in enumerate(self._items):
                if tid != task_id:
                    continue
                if status == "deleted":
                    del self._items[i]
                else:
                    new_state = todo_state(status, item.state)
                    new_text = clip(new_subject, TITLE_MAX_CHARS) if isinstance(new_subject, str) and new_subject else item.text
                    self._items[i] = (tid, TodoItem(text=new_text, state=new_state))
                return True, None
        return False, None

    def created(self, guessed: str, result_content: Any) -> None:
        """A TaskCreate's result names the real id ("Task #3 created ..."): use it."""
        text = result_content if isinstance(result_content, str) else str(result_content)
        match = _TASK_ID_RE.search(text)
        if match and match.group(1) != guessed:
            self._items = [((match.group(1) if tid == guessed else tid), item) for tid, item in self._items]

    def data(self) -> TodoData:
        """The list as a ``todo`` event's payload."""
        items = [item for _, item in self._items]
        return TodoData(items=items, done=sum(1 for i in items if i.state == "completed"), total=len(items))
