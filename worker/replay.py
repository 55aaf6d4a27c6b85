"""The replay program: a stand-in for the Claude Code CLI (``python -m worker.replay``).

It accepts the CLI's flags (``-p``, ``--output-format``, ``--verbose``,
``--session-id``, ``--model``, ``--max-turns``, ``--permission-mode``,
``--allowedTools``; unknown flags are ignored), prints a recorded stream-json
transcript line by line with its recorded delays divided by
``PS_REPLAY_SPEED``, and exits like the CLI: 0 after a successful result, 1
after an ``is_error`` result, 130 on SIGINT, 143 on SIGTERM.

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


def play(opts: Options, *, speed: float, path: Path) -> int:
    """Print the transcript; returns the exit code the CLI would use."""
    out = sys.stdout
    exit_code = 1  # a transcript without a result line is a crash
    wrappers = [json.loads(raw) for raw in path.read_text(encoding="utf-8").splitlines() if raw.strip()]
    final = next((w["j"] for w in wrappers if isinstance(w.get("j"), dict) and w["j"].get("type") == "result"), None)
    started = time.monotonic()
    for n, wrapper in enumerate(wrappers):
        try:
            _play_one(out, wrapper, opts, speed)
        except KeyboardInterrupt:
            # Like the CLI on SIGINT: a final error result with what was spent so far.
            out.write(json.dumps(interrupted_result(final, n / len(wrappers), started), separators=(",", ":")) + "\n")
            out.flush()
            raise
        if isinstance(wrapper.get("j"), dict) and wrapper["j"].get("type") == "result":
            exit_code = 1 if wrapper["j"].get("is_error") else 0
    return exit_code


def interrupted_result(final: dict[str, Any] | None, fraction: float, started: float) -> dict[str, Any]:
    """The ``error_during_execution`` result of an interrupted replay: the recorded totals, pro rata."""
    final = final or {}
    usage = final.get("usage") or {}
    return {
        "type": "result",
        "subtype": "error_during_execution",
        "is_error": True,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "num_turns": int(int(final.get("num_turns") or 0) * fraction),
        "total_cost_usd": round(float(final.get("total_cost_usd") or 0.0) * fraction, 6),
        "usage": {k: int(v * fraction) for k, v in usage.items() if isinstance(v, int)},
        "session_id": final.get("session_id"),
    }


def _play_one(out: Any, wrapper: dict[str, Any], opts: Options, speed: float) -> None:
    """Wait the recorded delay, then print one transcript line."""
    delay = float(wrapper.get("d", 0)) / 1000.0 / speed
    if delay > 0:
        time.sleep(delay)
    if "raw" in wrapper:
        out.write(str(wrapper["raw"]) + "\n")
    else:
        obj = personalize(wrapper["j"], opts)
        out.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    out.flush()


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
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 143
    except BrokenPipeError:
        # The reader went away: exit quietly, like a CLI piped into `head`.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
