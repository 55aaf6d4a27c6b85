"""stream-json -> job events: each transcript, bad input, to-do tools, phases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from progress_service.events import (
    DATA_TYPES,
    JobSnapshot,
    LogData,
    MessageData,
    NoticeData,
    PhaseData,
    ResultData,
    RetryData,
    StepData,
    TodoData,
    UsageData,
)
from worker.mapping import Mapped, Mapper
from worker.tools import is_test_command

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "worker" / "transcripts"


class Clock:
    """A deterministic clock: +10 ms per reading."""

    def __init__(self) -> None:
        self.t = 1_000_000

    def __call__(self) -> int:
        self.t += 10
        return self.t


def new_mapper() -> Mapper:
    return Mapper(JobSnapshot(id="j1", roomId="job:j1"), clock=Clock())


def play(name: str) -> tuple[Mapper, list[Mapped]]:
    mapper = new_mapper()
    events = mapper.status("running")
    for raw in (TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines():
        events += mapper.feed(json.dumps(json.loads(raw)["j"]).encode())
    return mapper, events


def kinds(events: list[Mapped]) -> list[str]:
    return [e.kind for e in events]


D = TypeVar("D", bound=msgspec.Struct)


def data(events: list[Mapped], cls: type[D]) -> list[D]:
    """The data of the events whose data is a ``cls`` (one kind), typed."""
    return [e.data for e in events if isinstance(e.data, cls)]


def one(event: Mapped, cls: type[D]) -> D:
    """The event's data, which must be a ``cls``."""
    assert isinstance(event.data, cls), event
    return event.data


def phases(events: list[Mapped]) -> list[str]:
    return [d.phase for d in data(events, PhaseData)]


def test_every_event_matches_its_protocol_type() -> None:
    for name in ("success", "fail", "max-turns", "long"):
        _, events = play(name)
        for e in events:
            # Round-trip through the shared types: no event has a stray shape.
            msgspec.convert(msgspec.to_builtins(e.data), DATA_TYPES[e.kind])


def result_line(name: str) -> dict[str, Any]:
    """The transcript's last ``result`` line, as the CLI printed it."""
    lines: list[dict[str, Any]] = [json.loads(raw)["j"] for raw in (TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines()]
    return [ln for ln in lines if ln["type"] == "result"][-1]


def test_transcripts_are_recorded_from_the_pinned_cli() -> None:
    version = (TRANSCRIPTS.parent.parent / ".claude-code-version").read_text().strip()
    for name in ("success", "fail", "max-turns", "long"):
        first = json.loads((TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines()[0])["j"]
        assert first["type"] == "system" and first["subtype"] == "init"
        assert first["claude_code_version"] == version


def test_success_transcript() -> None:
    mapper, events = play("success")
    ks = kinds(events)
    assert ks[:2] == ["status", "phase"] and one(events[1], PhaseData).phase == "starting"
    assert ks[-2:] == ["usage", "result"]
    # To-do updates (TaskUpdate between the edits) never pull the phase back to planning.
    assert phases(events) == ["starting", "planning", "editing", "testing", "reviewing", "finishing"]
    steps = data(events, StepData)
    started = [s for s in steps if s.state == "started"]
    assert [s.tool for s in started] == [
        "TaskCreate", "TaskCreate", "TaskCreate", "TaskUpdate", "Read", "TaskUpdate", "TaskUpdate", "Edit",
        "TaskUpdate", "TaskUpdate", "Bash", "TaskUpdate", "Bash",
    ]
    assert [s.title for s in started if s.tool == "Edit"] == ["calc.py"]
    assert all(s.state == "ok" and s.durationMs is not None for s in steps if s.state != "started")
    todos = data(events, TodoData)
    assert (todos[-1].done, todos[-1].total) == (3, 3)
    assert all(a.done <= b.done for a, b in zip(todos, todos[1:]))
    assert kinds(events).count("message") == 3
    printed = result_line("success")
    result = one(events[-1], ResultData)
    assert result.ok and result.error is None and result.costUsd == printed["total_cost_usd"]
    assert result.turns == printed["num_turns"] and result.summary == printed["result"]
    # The snapshot travels with each event and ends where the job ended.
    snap = events[-1].snapshot
    assert snap.progress.done == snap.progress.total == 3
    assert snap.usage.outputTokens == printed["usage"]["output_tokens"]
    assert snap.result == result and snap.phase == "finishing"
    # Earlier snapshots are not changed by later events.
    first_todo = next(e for e in events if e.kind == "todo")
    assert first_todo.snapshot.progress.done == 0 and first_todo.snapshot.phase == "planning"
    # Live usage from stream events: many updates, each output count >= the one before.
    usages = data(events, UsageData)
    assert len(usages) > 10
    assert all(a.outputTokens <= b.outputTokens for a, b in zip(usages, usages[1:]))
    assert mapper.result_is_error is False


def test_fail_transcript_shows_the_retries_and_the_api_error() -> None:
    mapper, events = play("fail")
    result = one(events[-1], ResultData)
    assert events[-1].kind == "result" and not result.ok
    assert result.error is not None and result.error.startswith("API Error: 529 Overloaded")
    retries = [e for e in events if e.kind == "retry"]
    assert [one(r, RetryData).text for r in retries] == [
        f"retrying the API ({n}/3, 529 overloaded, next in {one(r, RetryData).delayMs / 1000:.1f} s)" for n, r in enumerate(retries, 1)
    ]
    # The snapshot says "retrying" while it waits, and no longer once the run ended.
    assert retries[-1].snapshot.retry == retries[-1].data
    assert events[-1].snapshot.retry is None
    assert mapper.result_is_error is True


def test_max_turns_transcript_shows_the_errors_text() -> None:
    _, events = play("max-turns")
    result = one(events[-1], ResultData)
    assert not result.ok and result.turns == result_line("max-turns")["num_turns"]
    assert result.error == "error_max_turns: Reached maximum number of turns (3)"
    assert phases(events) == ["starting", "planning", "finishing"]


def test_long_transcript_has_hundreds_of_steps() -> None:
    _, events = play("long")
    steps = [d for d in data(events, StepData) if d.state == "started"]
    assert len(steps) >= 250
    todos = data(events, TodoData)
    assert todos[-1].done == todos[-1].total == 10
    assert one(events[-1], ResultData).ok


@pytest.mark.parametrize(
    "line",
    [
        b"not json at all",
        b"{\"type\": \"assistant\", \"message\": ",  # cut off
        b"[1, 2, 3]",
        b"42",
        b"\"a string\"",
        b"{\"type\": \"assistant\", \"message\": {\"content\": 5}}",  # wrong field type
        b"\xff\xfe binary \x00",
    ],
)
def test_garbage_becomes_a_log_event(line: bytes) -> None:
    mapper = new_mapper()
    events = mapper.feed(line)
    assert kinds(events) == ["log"]
    assert one(events[0], LogData).stream == "stdout"
    # The mapper keeps working afterwards.
    assert kinds(mapper.feed(b'{"type":"system","subtype":"init","session_id":"s"}')) == ["phase"]


def test_unknown_types_and_fields_are_ignored() -> None:
    mapper = new_mapper()
    assert mapper.feed(b'{"type":"stream_event","event":{"type":"content_block_delta"}}') == []
    assert mapper.feed(b'{"type":"brand_new_thing","x":1}') == []
    assert mapper.feed(b'{"type":"system","subtype":"task_progress","n":3}') == []
    assert mapper.feed(b"   ") == []
    events = mapper.feed(
        b'{"type":"assistant","new_top":true,"message":{"id":"m1","content":[{"type":"text","text":"hi",'
        b'"citations":[]},{"type":"server_tool_use","id":"x"}],"usage":{"input_tokens":3,"output_tokens":4,"x":1}}}'
    )
    assert kinds(events) == ["message", "usage"]
    usage = one(events[1], UsageData)
    assert usage.inputTokens == 3 and usage.outputTokens == 4


def test_usage_counts_each_message_once() -> None:
    mapper = new_mapper()
    line = b'{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":10,"output_tokens":5}}}'
    assert kinds(mapper.feed(line)) == ["message", "usage"]
    # The same message's next block repeats the usage: no new usage event.
    assert kinds(mapper.feed(line.replace(b'"a"', b'"b"'))) == ["message"]
    assert mapper.snapshot.usage.inputTokens == 10


def test_task_create_and_update_maintain_the_list() -> None:
    mapper = new_mapper()

    def use(tid: str, name: str, inp: dict[str, Any]) -> list[Mapped]:
        msg = {"type": "assistant", "message": {"content": [{"type": "tool_use", "id": tid, "name": name, "input": inp}]}}
        return mapper.feed(json.dumps(msg).encode())

    def result(tid: str, text: str) -> list[Mapped]:
        msg = {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": tid, "content": text}]}}
        return mapper.feed(json.dumps(msg).encode())

    use("t1", "TaskCreate", {"subject": "Write parser", "description": "..."})
    result("t1", "Task #1 created successfully: Write parser")
    use("t2", "TaskCreate", {"subject": "Test parser"})
    result("t2", "Task #2 created successfully: Test parser")
    events = use("t3", "TaskUpdate", {"taskId": "1", "status": "completed"})
    todo = data(events, TodoData)[-1]
    assert [(i.text, i.state) for i in todo.items] == [("Write parser", "completed"), ("Test parser", "pending")]
    assert (todo.done, todo.total) == (1, 2)
    assert mapper.snapshot.phase == "planning"
    events = use("t4", "TaskUpdate", {"taskId": "2", "status": "deleted"})
    todo = data(events, TodoData)[-1]
    assert (todo.done, todo.total) == (1, 1)


def test_tool_result_for_unknown_tool_use() -> None:
    mapper = new_mapper()
    events = mapper.feed(
        b'{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"zz","content":"x","is_error":true}]}}'
    )
    assert kinds(events) == ["step"] and one(events[0], StepData).state == "error"


def test_long_texts_are_clipped() -> None:
    mapper = new_mapper()
    text = "x" * 50_000
    msg = {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    (event,) = mapper.feed(json.dumps(msg).encode())
    assert len(one(event, MessageData).text) == 2000
    (log,) = mapper.log("stderr", "e" * 50_000)
    assert len(one(log, LogData).line) == 2000


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("pytest -q", True),
        ("cd app && python -m pytest tests/", True),
        ("python3 -m unittest discover", True),
        ("npm test", True),
        ("npm run test -- --watch=false", True),
        ("go test ./...", True),
        ("cargo test", True),
        ("make test", True),
        ("tox -e py311", True),
        ("npx jest src", True),
        ("npx vitest run", True),
        ("ls -la", False),
        ("git status", False),
        ("pip install pytest-cov", False),
        ("cat pytest.ini", False),
        ("npm install", False),
    ],
)
def test_is_test_command(command: str, expected: bool) -> None:
    assert is_test_command(command) is expected


def _line(kind: str, blocks: list[dict], parent: str | None = None) -> bytes:
    return json.dumps({"type": kind, "parent_tool_use_id": parent, "message": {"content": blocks}}).encode()


def test_steps_carry_input_output_exit_code_and_parent() -> None:
    mapper = new_mapper()
    edit = {"file_path": "app.py", "old_string": "a = 1\n", "new_string": "a = 2\n"}
    (started,) = [e for e in mapper.feed(_line("assistant", [{"type": "tool_use", "id": "e1", "name": "Edit", "input": edit}])) if e.kind == "step"]
    edit_input = one(started, StepData).input
    assert edit_input is not None and edit_input.path == "app.py"
    assert edit_input.diff is not None and "-a = 1\n+a = 2\n" in edit_input.diff
    bash = {"command": "pytest -q", "description": "run tests"}
    mapper.feed(_line("assistant", [{"type": "tool_use", "id": "b1", "name": "Bash", "input": bash}], parent="task1"))
    result = [{"type": "tool_result", "tool_use_id": "b1", "is_error": True,
               "content": [{"type": "text", "text": "Exit code 2\nFAILED test_x.py::test_y"}]}]
    (done,) = mapper.feed(_line("user", result, parent="task1"))
    test_run = one(done, StepData)
    assert test_run.state == "error" and test_run.exitCode == 2
    assert test_run.error == "Exit code 2" and test_run.output is not None and "FAILED test_x.py" in test_run.output
    assert test_run.parentStepId == "task1"
    big = "y" * 100_000
    mapper.feed(_line("assistant", [{"type": "tool_use", "id": "r1", "name": "Read", "input": {"file_path": "b.txt"}}]))
    (read,) = mapper.feed(_line("user", [{"type": "tool_result", "tool_use_id": "r1", "content": big}]))
    read_step = one(read, StepData)
    assert read_step.outputChars == 100_000 and read_step.output is not None and len(read_step.output) < 20_000
    assert read_step.exitCode is None and read_step.error is None
    msgspec.convert(msgspec.to_builtins(read.data), DATA_TYPES["step"])


# --------------------------------------------------------------------------
# Lines of the current CLI (shapes as CLI 2.1.332 prints them)
# --------------------------------------------------------------------------


def feed_all(mapper: Mapper, *lines: dict[str, Any]) -> list[Mapped]:
    out: list[Mapped] = []
    for line in lines:
        out += mapper.feed(json.dumps(line).encode())
    return out


def tool_use(tid: str, name: str, inp: dict[str, Any], parent: str | None = None, msg: str = "m1") -> dict[str, Any]:
    return {"type": "assistant", "parent_tool_use_id": parent,
            "message": {"id": msg, "content": [{"type": "tool_use", "id": tid, "name": name, "input": inp}]}}


def tool_result(tid: str, content: str = "ok", is_error: bool = False, parent: str | None = None) -> dict[str, Any]:
    return {"type": "user", "parent_tool_use_id": parent,
            "message": {"content": [{"type": "tool_result", "tool_use_id": tid, "content": content, "is_error": is_error}]}}


def test_background_subagent_step_ends_with_its_task_and_nests_its_steps() -> None:
    mapper = new_mapper()
    events = feed_all(
        mapper,
        tool_use("a1", "Agent", {"description": "inspect repo", "prompt": "look"}),
        {"type": "system", "subtype": "task_started", "task_id": "t1", "tool_use_id": "a1", "description": "inspect repo",
         "is_backgrounded": True, "task_type": "local_agent"},
        tool_result("a1", "Async agent launched successfully."),
        tool_use("b1", "Bash", {"command": "ls"}, parent="a1", msg="m2"),
        {"type": "system", "subtype": "task_progress", "task_id": "t1", "tool_use_id": "a1", "description": "Running ls"},
        tool_result("b1", "README.md", parent="a1"),
        {"type": "system", "subtype": "task_notification", "task_id": "t1", "tool_use_id": "a1", "status": "completed",
         "summary": "one file"},
    )
    agent = [d for d in data(events, StepData) if d.stepId == "a1"]
    # The launch result does not end the step; the notification does.
    assert [s.state for s in agent] == ["started", "started", "ok"]
    child = [d for d in data(events, StepData) if d.stepId == "b1"]
    assert {s.parentStepId for s in child} == {"a1"}
    notices = [d.text for d in data(events, NoticeData)]
    assert notices == ["subagent started: inspect repo", "subagent completed: one file"]


def test_foreground_shell_tasks_are_not_announced() -> None:
    mapper = new_mapper()
    events = feed_all(
        mapper,
        tool_use("b1", "Bash", {"command": "make"}),
        {"type": "system", "subtype": "task_started", "task_id": "x", "tool_use_id": "b1", "task_type": "local_bash",
         "is_backgrounded": False},
        {"type": "system", "subtype": "task_notification", "task_id": "x", "tool_use_id": "b1", "status": "completed"},
        tool_result("b1"),
    )
    assert "notice" not in kinds(events)
    assert [d.state for d in data(events, StepData)] == ["started", "ok"]


def test_permission_denied_hooks_compaction_and_rate_limits_are_notices() -> None:
    mapper = new_mapper()
    events = feed_all(
        mapper,
        {"type": "system", "subtype": "permission_denied", "tool_name": "Bash", "tool_use_id": "b1",
         "message": "This command requires approval"},
        {"type": "system", "subtype": "hook_response", "hook_name": "PreToolUse:Bash", "outcome": "error",
         "exit_code": 2, "stderr": "blocked by policy\n"},
        {"type": "system", "subtype": "compact_boundary", "compact_metadata": {"trigger": "auto", "pre_tokens": 180000}},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning", "rateLimitType": "five_hour",
                                                         "utilization": 0.91}},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}},
        {"type": "system", "subtype": "brand_new_subtype", "x": 1},
    )
    assert [(one(e, NoticeData).kind, one(e, NoticeData).text) for e in events] == [
        ("permission_denied", "permission denied: Bash: This command requires approval"),
        ("hook", "hook PreToolUse:Bash: error (exit 2): blocked by policy"),
        ("compact", "conversation compacted (auto, 180000 tokens before)"),
        ("rate_limit", "rate limit (five_hour): allowed_warning, 91% used"),
    ]
    assert one(events[0], NoticeData).stepId == "b1"


def test_stream_events_count_tokens_live_and_end_the_turn() -> None:
    clock = Clock()
    mapper = Mapper(JobSnapshot(id="j1", roomId="job:j1"), clock=clock)

    def se(event: dict[str, Any]) -> dict[str, Any]:
        return {"type": "stream_event", "event": event, "parent_tool_use_id": None}

    events = feed_all(
        mapper,
        se({"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 100, "output_tokens": 1}}}),
        se({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    )
    for _ in range(5):
        clock.t += 1500  # more than the throttle apart
        events += feed_all(mapper, se({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 60}}))
    events += feed_all(
        mapper,
        {"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "All done."}],
                                          "stop_reason": None, "usage": {"input_tokens": 100, "output_tokens": 1}}},
        se({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 80}}),
    )
    outs = [d.outputTokens for d in data(events, UsageData)]
    assert outs == sorted(outs) and outs[0] == 1 and outs[-1] == 80 and len(set(outs)) >= 5
    assert phases(events) == ["reviewing"]  # the message that ended the turn had text


def test_no_result_reason_carries_the_last_stderr_lines() -> None:
    mapper = new_mapper()
    mapper.log("stderr", "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons")
    assert mapper.no_result_reason(1) == (
        "exited with code 1 and no result: "
        "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons"
    )
    assert new_mapper().no_result_reason(137) == "exited with code 137 and no result"


def test_result_totals_include_subagents_and_every_error_text() -> None:
    mapper = new_mapper()
    (usage, result) = [e for e in feed_all(mapper, {
        "type": "result", "subtype": "error_max_turns", "is_error": True, "num_turns": 3, "total_cost_usd": 0.02,
        "usage": {"input_tokens": 2000, "output_tokens": 40},
        "modelUsage": {"m": {"inputTokens": 5000, "outputTokens": 70, "cacheReadInputTokens": 100}},
        "errors": ["Reached maximum number of turns (2)"],
    }) if e.kind in ("usage", "result")]
    totals = one(usage, UsageData)
    assert (totals.inputTokens, totals.outputTokens, totals.costUsd) == (5100, 70, 0.02)
    assert one(result, ResultData).error == "error_max_turns: Reached maximum number of turns (2)"


def test_a_field_of_a_new_shape_is_dropped_not_the_line() -> None:
    mapper = new_mapper()
    events = feed_all(mapper, {
        "type": "result", "subtype": "success", "is_error": False, "num_turns": 2, "total_cost_usd": 0.5,
        "result": "done", "usage": {"input_tokens": 10, "output_tokens": 4},
        "modelUsage": ["a", "list", "now"], "errors": {"not": "a list"},
    })
    assert kinds(events) == ["log", "phase", "usage", "result"]
    assert "modelUsage, errors" in one(events[0], LogData).line
    final = one(events[-1], ResultData)
    assert final.ok and final.costUsd == 0.5 and mapper.snapshot.usage.outputTokens == 4
