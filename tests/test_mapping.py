"""stream-json -> job events: each transcript, bad input, to-do tools, phases."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from progress_service.events import DATA_TYPES, JobSnapshot
from worker.mapping import Mapped, Mapper, is_test_command

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


def phases(events: list[Mapped]) -> list[str]:
    return [e.data.phase for e in events if e.kind == "phase"]  # type: ignore[attr-defined]


def test_every_event_matches_its_protocol_type() -> None:
    for name in ("success", "fail", "max-turns", "long"):
        _, events = play(name)
        for e in events:
            # Round-trip through the shared types: no event has a stray shape.
            msgspec.convert(msgspec.to_builtins(e.data), DATA_TYPES[e.kind])


def test_success_transcript() -> None:
    mapper, events = play("success")
    ks = kinds(events)
    assert ks[:2] == ["status", "phase"] and events[1].data.phase == "starting"  # type: ignore[attr-defined]
    assert ks[-2:] == ["usage", "result"]
    # To-do updates (TodoWrite between the edits) never pull the phase back to planning.
    assert phases(events) == ["starting", "planning", "editing", "testing", "reviewing", "finishing"]
    steps = [e.data for e in events if e.kind == "step"]
    started = [s for s in steps if s.state == "started"]  # type: ignore[attr-defined]
    assert [s.tool for s in started] == [  # type: ignore[attr-defined]
        "Glob", "Read", "Read", "TodoWrite", "Edit", "TodoWrite", "Edit", "TodoWrite", "Bash", "TodoWrite",
    ]
    assert [s.title for s in started if s.tool == "Edit"] == ["src/calc.py", "tests/test_calc.py"]  # type: ignore[attr-defined]
    assert all(s.state == "ok" and s.durationMs is not None for s in steps if s.state != "started")  # type: ignore[attr-defined]
    todos = [e.data for e in events if e.kind == "todo"]
    assert [(t.done, t.total) for t in todos] == [(0, 3), (1, 3), (2, 3), (3, 3)]  # type: ignore[attr-defined]
    assert kinds(events).count("message") == 3
    result = events[-1].data
    assert result.ok and result.error is None and result.costUsd == pytest.approx(0.0421)  # type: ignore[attr-defined]
    assert result.turns == 12 and "regression" in result.summary  # type: ignore[attr-defined]
    # The snapshot travels with each event and ends where the job ended.
    snap = events[-1].snapshot
    assert snap.progress.done == snap.progress.total == 3
    assert snap.costUsd == pytest.approx(0.0421) and snap.usage.outputTokens > 0
    assert snap.result == result and snap.phase == "finishing"
    # Earlier snapshots are not changed by later events.
    first_todo = next(e for e in events if e.kind == "todo")
    assert first_todo.snapshot.progress.done == 0 and first_todo.snapshot.phase == "planning"
    usages = [e.data for e in events if e.kind == "usage"]
    assert all(a.outputTokens <= b.outputTokens for a, b in zip(usages, usages[1:]))  # type: ignore[attr-defined]
    assert mapper.result_is_error is False


def test_fail_transcript_is_error_wins_over_subtype() -> None:
    mapper, events = play("fail")
    result = events[-1].data
    assert events[-1].kind == "result" and not result.ok  # type: ignore[attr-defined]
    assert "Overloaded" in result.error  # type: ignore[attr-defined]
    bash = [e.data for e in events if e.kind == "step" and e.data.tool == "Bash"]  # type: ignore[attr-defined]
    assert [s.state for s in bash] == ["started", "error"]  # type: ignore[attr-defined]
    # `git status` is not a test run: the phase stays where it was.
    assert phases(events) == ["starting", "planning", "finishing"]
    assert mapper.result_is_error is True


def test_max_turns_transcript() -> None:
    _, events = play("max-turns")
    result = events[-1].data
    assert not result.ok and result.error == "error_max_turns" and result.turns == 4  # type: ignore[attr-defined]
    assert phases(events) == ["starting", "planning", "editing", "testing", "finishing"]


def test_long_transcript_has_hundreds_of_steps() -> None:
    _, events = play("long")
    steps = [e for e in events if e.kind == "step" and e.data.state == "started"]  # type: ignore[attr-defined]
    assert len(steps) >= 300
    todos = [e.data for e in events if e.kind == "todo"]
    assert todos[-1].done == todos[-1].total == 10  # type: ignore[attr-defined]
    assert events[-1].data.ok  # type: ignore[attr-defined]


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
    assert events[0].data.stream == "stdout"  # type: ignore[attr-defined]
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
    assert events[1].data.inputTokens == 3 and events[1].data.outputTokens == 4  # type: ignore[attr-defined]


def test_usage_counts_each_message_once() -> None:
    mapper = new_mapper()
    line = b'{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":10,"output_tokens":5}}}'
    assert kinds(mapper.feed(line)) == ["message", "usage"]
    # The same message's next block repeats the usage: no new usage event.
    assert kinds(mapper.feed(line.replace(b'"a"', b'"b"'))) == ["message"]
    assert mapper.snapshot.usage.inputTokens == 10


def test_task_create_and_update_maintain_the_list() -> None:
    mapper = new_mapper()

    def use(tid: str, name: str, inp: dict) -> list[Mapped]:
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
    todo = [e.data for e in events if e.kind == "todo"][-1]
    assert [(i.text, i.state) for i in todo.items] == [("Write parser", "completed"), ("Test parser", "pending")]  # type: ignore[attr-defined]
    assert (todo.done, todo.total) == (1, 2)  # type: ignore[attr-defined]
    assert mapper.snapshot.phase == "planning"
    events = use("t4", "TaskUpdate", {"taskId": "2", "status": "deleted"})
    todo = [e.data for e in events if e.kind == "todo"][-1]
    assert (todo.done, todo.total) == (1, 1)  # type: ignore[attr-defined]


def test_tool_result_for_unknown_tool_use() -> None:
    mapper = new_mapper()
    events = mapper.feed(
        b'{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"zz","content":"x","is_error":true}]}}'
    )
    assert kinds(events) == ["step"] and events[0].data.state == "error"  # type: ignore[attr-defined]


def test_long_texts_are_clipped() -> None:
    mapper = new_mapper()
    text = "x" * 50_000
    msg = {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}
    (event,) = mapper.feed(json.dumps(msg).encode())
    assert len(event.data.text) == 2000  # type: ignore[attr-defined]
    (log,) = mapper.log("stderr", "e" * 50_000)
    assert len(log.data.line) == 2000  # type: ignore[attr-defined]


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
    assert started.data.input.path == "app.py"  # type: ignore[attr-defined]
    assert "-a = 1\n+a = 2\n" in started.data.input.diff  # type: ignore[attr-defined]
    bash = {"command": "pytest -q", "description": "run tests"}
    mapper.feed(_line("assistant", [{"type": "tool_use", "id": "b1", "name": "Bash", "input": bash}], parent="task1"))
    result = [{"type": "tool_result", "tool_use_id": "b1", "is_error": True,
               "content": [{"type": "text", "text": "Exit code 2\nFAILED test_x.py::test_y"}]}]
    (done,) = mapper.feed(_line("user", result, parent="task1"))
    assert done.data.state == "error" and done.data.exitCode == 2  # type: ignore[attr-defined]
    assert done.data.error == "Exit code 2" and "FAILED test_x.py" in done.data.output  # type: ignore[attr-defined]
    assert done.data.parentStepId == "task1"  # type: ignore[attr-defined]
    big = "y" * 100_000
    mapper.feed(_line("assistant", [{"type": "tool_use", "id": "r1", "name": "Read", "input": {"file_path": "b.txt"}}]))
    (read,) = mapper.feed(_line("user", [{"type": "tool_result", "tool_use_id": "r1", "content": big}]))
    assert read.data.outputChars == 100_000 and len(read.data.output) < 20_000  # type: ignore[attr-defined]
    assert read.data.exitCode is None and read.data.error is None  # type: ignore[attr-defined]
    msgspec.convert(msgspec.to_builtins(read.data), DATA_TYPES["step"])
