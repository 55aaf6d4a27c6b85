"""Record the replay program's transcripts from real Claude Code runs.

``python tests/record_transcripts.py`` (after ``make claude``) runs the pinned
CLI against the scripted model server (``tests/model_server.py``) on a fresh
repository per transcript and writes ``worker/transcripts/<name>.jsonl``:
every stdout line the CLI printed, wrapped as ``{"d": <ms since the line
before>, "j": <the line>}`` for ``worker/replay.py``. The delays are the
recorded ones: the model server is paced (``pace`` in ``cli_scenarios``) so a
demo reads like a real session. Machine-specific paths and the server's port
are replaced by fixed ones; nothing else is changed. Commit the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import cli_scenarios as sc  # noqa: E402
from conftest import CLAUDE_BIN, claude_offline_env  # noqa: E402
from model_server import ModelServer, ToolUse, reply  # noqa: E402

OUT = ROOT / "worker" / "transcripts"
WORKDIR = "/workspace/demo"
HOME = "/home/worker"


def fail_scenario() -> sc.Scenario:
    """One good turn, then the API stays overloaded through every retry."""
    return sc.Scenario(
        name="fail",
        prompt="Check the build.",
        spec={"permissionMode": "acceptEdits"},
        turns=[
            reply("Let me look at the repository first.", ToolUse("Bash", {"command": "git status --short", "description": "Status"}), delay=1.0),
            reply("never", errors=(529,) * 10),
        ],
    )


TEST_PKG = "import unittest\n\n\nclass Smoke(unittest.TestCase):\n    def test_imports(self):\n        import pkg  # noqa: F401\n"


def long_scenario(tasks: int = 10, files: int = 12) -> sc.Scenario:
    """A long refactor: ten to-dos, each reading and editing a dozen modules, then testing."""
    sources = {f"pkg/mod{t}_{f}.py": f"VALUE = {t * 100 + f}\n" for t in range(tasks) for f in range(files)}
    turns = [reply(
        f"This is a big refactor; I'll split it into {tasks} tasks.",
        *[ToolUse("TaskCreate", {"subject": f"Refactor module group {t}", "description": f"pkg/mod{t}_*"}) for t in range(tasks)],
        delay=0.6,
    )]
    for t in range(tasks):
        names = [f"pkg/mod{t}_{f}.py" for f in range(files)]
        turns += [
            reply(ToolUse("TaskUpdate", {"taskId": str(t + 1), "status": "in_progress"}), delay=0.3),
            reply(*[ToolUse("Read", {"file_path": n}) for n in names], delay=0.4),
            reply(*[ToolUse("Edit", {"file_path": n, "old_string": sources[n], "new_string": sources[n].replace("VALUE", "LIMIT")}) for n in names], delay=0.4),
            reply(ToolUse("Bash", {"command": "python3 -m unittest -q", "description": "Run the tests"}), delay=0.3),
            reply(f"Group {t} done.", ToolUse("TaskUpdate", {"taskId": str(t + 1), "status": "completed"}), delay=0.3),
        ]
    return sc.Scenario(
        name="long",
        prompt="Rename VALUE to LIMIT in every module.",
        spec={"permissionMode": "acceptEdits", "allowedTools": ["TaskCreate", "TaskUpdate", "Bash(python3 -m unittest *)"]},
        files={"README.md": "# pkg\n", "test_pkg.py": TEST_PKG, "pkg/__init__.py": "", **sources},
        turns=turns,
        final=f"Renamed VALUE to LIMIT in all {tasks * files} modules; the tests pass.",
    )


def scenarios() -> dict[str, sc.Scenario]:
    success = sc.fix_bug("success", pace=1.2)
    turns = sc.max_turns("max-turns")
    turns.spec["maxTurns"] = 3
    turns.turns = [reply(t.blocks[0], delay=0.8) for t in turns.turns]
    return {"success": success, "fail": fail_scenario(), "max-turns": turns, "long": long_scenario()}


def record(name: str, scenario: sc.Scenario, server: ModelServer, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run the CLI once; every stdout line with the milliseconds since the line before."""
    with tempfile.TemporaryDirectory() as tmp:
        work = scenario.make_repo(Path(tmp) / "repo")
        prompt = scenario.install(server)
        argv = [str(CLAUDE_BIN), "-p", prompt, "--output-format", "stream-json", "--verbose", "--include-partial-messages"]
        spec = scenario.spec
        if spec.get("maxTurns"):
            argv += ["--max-turns", str(spec["maxTurns"])]
        if spec.get("permissionMode"):
            argv += ["--permission-mode", spec["permissionMode"]]
        if spec.get("allowedTools"):
            argv += ["--allowedTools", *spec["allowedTools"]]
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[dict[str, Any]] = []
        last = time.monotonic()
        assert proc.stdout is not None
        for raw in proc.stdout:
            now = time.monotonic()
            if raw.strip():
                text = raw.strip().replace(str(work), WORKDIR).replace(env["HOME"], HOME).replace(tmp, "/tmp")
                text = text.replace(server.url.removeprefix("http://"), "127.0.0.1:8080")
                lines.append({"d": int((now - last) * 1000), "j": json.loads(text)})
                last = now
        code = proc.wait()
        print(f"{name}: exit {code}, {len(lines)} lines, {sum(x['d'] for x in lines) / 1000:.1f} s", file=sys.stderr)
        return lines


def main() -> int:
    if not CLAUDE_BIN.exists():
        print(f"no CLI at {CLAUDE_BIN}: run `make claude` first", file=sys.stderr)
        return 2
    with ModelServer() as server, tempfile.TemporaryDirectory() as home:
        env = {**os.environ, **claude_offline_env(server.url, Path(home)), "CLAUDE_CODE_MAX_RETRIES": "3"}
        for name, scenario in scenarios().items():
            lines = record(name, scenario, server, env)
            with (OUT / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
