"""The replay program: a stand-in for the Claude Code CLI (``python -m worker.replay``).

It accepts the CLI's flags (``-p``, ``--output-format``, ``--verbose``,
``--session-id``, ``--model``, ``--max-turns``, ``--permission-mode``,
``--allowedTools``; unknown flags are ignored), prints a recorded stream-json
transcript line by line with its recorded delays divided by
``PS_REPLAY_SPEED``, and exits like the CLI: 0 after a successful result, 1
after an ``is_error`` result, 130 on SIGINT (after printing the CLI's last
lines: an error ``tool_result`` and an ``error_during_execution`` result with
the cost so far), 143 on SIGTERM.

The transcript is ``PS_REPLAY_TRANSCRIPT`` (a name in ``transcripts/`` or a
path to a ``.jsonl`` file), else picked by a tag in the prompt: ``[fail]``,
``[max-turns]``, ``[long]``, or ``[transcript:NAME.jsonl]`` for a file of
that name in the job's working directory (tests generate long ones there);
anything else plays ``success``.

Transcript files wrap each stream-json object with its delay
(``{"d": ms, "j": {...}}``, or ``{"d": ms, "raw": "text"}`` for a verbatim
line); only the object is printed, so the output is exactly stream-json.
The init line reports the session id, model, cwd and permission mode the
program was started with, like the CLI does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

TRANSCRIPTS = Path(__file__).parent / "transcripts"
TAGS = (("[fail]", "fail"), ("[max-turns]", "max-turns"), ("[long]", "long"))
#: A transcript file in the working directory: a plain name, never a path.
_OWN_RE = re.compile(r"\[transcript:([A-Za-z0-9_.-]{1,100}\.jsonl)\]")

#: Flags that take one value; everything else starting with ``-`` is a switch.
_VALUE_FLAGS = {
    "--output-format",
    "--input-format",
    "--session-id",
    "--model",
    "--max-turns",
    "--permission-mode",
    "--append-system-prompt",
    "--system-prompt",
    "--fallback-model",
    "--resume",
    "-r",
    "--settings",
    "--mcp-config",
    "--max-budget-usd",
    "--input-format",
    "--permission-prompt-tool",
    "--permission-prompts",
}
_LIST_FLAGS = {"--allowedTools", "--allowed-tools", "--disallowedTools", "--disallowed-tools", "--add-dir"}


class Options:
    """What the program was asked to do (the subset of CLI flags that matters)."""

    def __init__(self) -> None:
        self.prompt = ""
        self.flags: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.ignored: list[str] = []


def parse_args(argv: list[str]) -> Options:
    """Parse CLI-style arguments; unknown flags are ignored, never an error.

    ``-p``/``--print`` is a switch in the real CLI and the prompt is the
    positional argument; the word right after ``-p`` is taken as the prompt
    even when it starts with a dash.
    """
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-p", "--print"):
            if i + 1 < len(argv) and argv[i + 1] not in _VALUE_FLAGS | _LIST_FLAGS:
                opts.prompt = argv[i + 1]
                i += 1
        elif "=" in arg and arg.startswith("--") and arg.split("=", 1)[0] in _VALUE_FLAGS:
            name, value = arg.split("=", 1)
            opts.flags[name] = value
        elif arg in _VALUE_FLAGS:
            if i + 1 < len(argv):
                opts.flags[arg] = argv[i + 1]
                i += 1
        elif arg in _LIST_FLAGS:
            values = opts.lists.setdefault(arg, [])
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values.append(argv[i + 1])
                i += 1
        elif arg.startswith("-"):
            opts.ignored.append(arg)
        elif not opts.prompt:
            opts.prompt = arg
        i += 1
    return opts


def first_stdin_prompt() -> str:
    """The prompt as the CLI takes it with ``--input-format stream-json``: the first user message on stdin.

    Later stdin lines (instructions) are not read: a recording cannot follow
    them, so the worker reports them as not delivered when the run ends.
    """
    line = sys.stdin.readline()
    try:
        content = json.loads(line).get("message", {}).get("content", "")
    except (ValueError, AttributeError):
        return ""
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content if isinstance(content, str) else ""


def pick_transcript(prompt: str, forced: str | None) -> Path:
    """The transcript file to play (see the module docstring)."""
    if forced:
        if forced.endswith(".jsonl") or os.sep in forced:
            return Path(forced)
        return TRANSCRIPTS / f"{forced}.jsonl"
    own = _OWN_RE.search(prompt)
    if own:
        return Path.cwd() / own.group(1)
    lowered = prompt.lower()
    for tag, name in TAGS:
        if tag in lowered:
            return TRANSCRIPTS / f"{name}.jsonl"
    return TRANSCRIPTS / "success.jsonl"


def personalize(obj: dict[str, Any], opts: Options) -> dict[str, Any]:
    """Make the recorded line report this run's session, model, cwd and mode."""
    session = opts.flags.get("--session-id")
    if session and "session_id" in obj:
        obj["session_id"] = session
    if obj.get("type") == "system" and obj.get("subtype") == "init":
        obj["cwd"] = os.getcwd()
        if "--model" in opts.flags:
            obj["model"] = opts.flags["--model"]
        if "--permission-mode" in opts.flags:
            obj["permissionMode"] = opts.flags["--permission-mode"]
    return obj


class _Terminated(Exception):
    pass


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise _Terminated


class _Progress:
    """What has been printed so far: enough to end like the CLI when interrupted."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.total = max(1, len(lines))
        final: dict[str, Any] = next((w["j"] for w in reversed(lines) if w.get("j", {}).get("type") == "result"), {})
        self.final_cost = float(final.get("total_cost_usd") or 0.0)
        self.final_usage = {k: v for k, v in (final.get("usage") or {}).items() if isinstance(v, int)}
        self.printed = 0
        self.turns: set[str] = set()
        self.open_tools: dict[str, None] = {}  # tool_use ids without a tool_result yet
        self.session = ""

    def saw(self, obj: dict[str, Any]) -> None:
        self.printed += 1
        self.session = obj.get("session_id") or self.session
        content = (obj.get("message") or {}).get("content")
        if obj.get("type") == "assistant":
            self.turns.add(str(obj["message"].get("id")))
        for block in content if isinstance(content, list) else ():
            if block.get("type") == "tool_use":
                self.open_tools[block["id"]] = None
            elif block.get("type") == "tool_result":
                self.open_tools.pop(block.get("tool_use_id"), None)

    def interrupted(self) -> list[dict[str, Any]]:
        """The CLI's last lines after SIGINT: an error tool_result for the running tool, then the result."""
        lines: list[dict[str, Any]] = []
        if self.open_tools:
            tool = list(self.open_tools)[-1]
            lines.append({
                "type": "user",
                "message": {"role": "user", "content": [{
                    "tool_use_id": tool, "type": "tool_result", "is_error": True,
                    "content": "[Request interrupted by user for tool use]",
                }]},
                "parent_tool_use_id": None,
                "session_id": self.session,
            })
        share = self.printed / self.total
        cost = round(self.final_cost * share, 6)
        lines.append({
            "type": "result", "subtype": "error_during_execution", "is_error": True,
            "num_turns": len(self.turns), "session_id": self.session, "total_cost_usd": cost,
            "usage": {k: int(v * share) for k, v in self.final_usage.items()}, "permission_denials": [],
        })
        return lines


def _emit(out: Any, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    out.flush()


def play(opts: Options, *, speed: float, path: Path) -> int:
    """Print the transcript; returns the exit code the CLI would use.

    On SIGINT it ends like the CLI: an error ``tool_result`` for the tool
    that was running, then a ``result`` of subtype ``error_during_execution``
    with the cost so far (the recorded total, pro rata), exit status 130.
    """
    out = sys.stdout
    exit_code = 1  # a transcript without a result line is a crash
    with path.open(encoding="utf-8") as fh:
        wrappers = [json.loads(raw) for raw in fh if raw.strip()]
    progress = _Progress(wrappers)
    try:
        for wrapper in wrappers:
            delay = float(wrapper.get("d", 0)) / 1000.0 / speed
            if delay > 0:
                time.sleep(delay)
            if "raw" in wrapper:
                out.write(str(wrapper["raw"]) + "\n")
                out.flush()
            else:
                obj = personalize(wrapper["j"], opts)
                _emit(out, obj)
                progress.saw(obj)
                if obj.get("type") == "result":
                    exit_code = 1 if obj.get("is_error") else 0
    except KeyboardInterrupt:
        for obj in progress.interrupted():
            _emit(out, obj)
        return 130
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        speed = float(os.environ.get("PS_REPLAY_SPEED") or 1.0)
    except ValueError:
        speed = 1.0
    if speed <= 0:
        speed = 1.0
    if opts.flags.get("--input-format") == "stream-json" and not opts.prompt:
        opts.prompt = first_stdin_prompt()
    path = pick_transcript(opts.prompt, os.environ.get("PS_REPLAY_TRANSCRIPT") or None)
    if opts.flags.get("--output-format", "stream-json") != "stream-json":
        print("replay: only --output-format stream-json is supported", file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"replay: no transcript {path}", file=sys.stderr)
        return 2
    print(f"replay: playing {path.name} at {speed:g}x (this is a recorded demo, not Claude)", file=sys.stderr)
    try:
        return play(opts, speed=speed, path=path)
    except KeyboardInterrupt:  # a second SIGINT while printing the last lines
        return 130
    except _Terminated:
        return 143
    except BrokenPipeError:
        # The reader went away: exit quietly, like a CLI piped into `head`.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
