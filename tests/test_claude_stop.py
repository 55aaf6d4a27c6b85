"""Stopping a CLI: SIGINT, then SIGTERM only once the CLI has stopped printing (``worker/claude.py``).

A worker behind on reading (a busy machine, ten jobs at once) keeps the
CLI's pipe full, so after SIGINT the CLI can still be writing its last lines,
its cost among them, when the grace is up. A SIGTERM then loses them.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio

from worker.claude import Line, start_claude

GRACE = 1.0

# On SIGINT: six last lines 0.25 s apart (1.5 s: past the grace, within twice
# it), then the result line, exit 130 (like the CLI after Ctrl-C).
SLOW_LAST_LINES = """
import signal, sys, time
def on_int(*_):
    for n in range(6):
        print(f"last {n}", flush=True)
        time.sleep(0.25)
    print("result", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, on_int)
print("ready", flush=True)
while True:
    time.sleep(1)
"""

# Ignores SIGINT and prints forever: still printing is no reason to wait forever.
CHATTY_FOREVER = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
while True:
    print("still here", flush=True)
    time.sleep(0.1)
"""


async def stop_when_ready(script: str, cwd: Path) -> tuple[list[bytes], int | None, float]:
    """Run ``script`` as the CLI, stop it once it printed ``ready``; (stdout lines, exit code, seconds the stop took)."""
    got: list[bytes] = []
    took: list[float] = []
    async with start_claude([sys.executable, "-c", script], cwd=cwd, env=None, grace=GRACE) as proc:

        async def stop() -> None:
            t0 = anyio.current_time()
            await proc.stop()
            took.append(anyio.current_time() - t0)

        async with anyio.create_task_group() as tg:
            lines = proc.start_output(tg)
            async with lines:
                async for item in lines:
                    if isinstance(item, Line) and item.stream == "stdout":
                        got.append(item.data)
                        if item.data == b"ready":
                            tg.start_soon(stop)
    return got, proc.returncode, took[0]


async def test_a_cli_still_printing_its_last_lines_gets_them_out(tmp_path: Path) -> None:
    got, code, took = await stop_when_ready(SLOW_LAST_LINES, tmp_path)
    assert got[-7:] == [b"last 0", b"last 1", b"last 2", b"last 3", b"last 4", b"last 5", b"result"]
    assert code == 130, "exited on its own after SIGINT, not by SIGTERM"
    assert took > GRACE


async def test_a_cli_that_keeps_printing_gets_sigterm_after_twice_the_grace(tmp_path: Path) -> None:
    got, code, took = await stop_when_ready(CHATTY_FOREVER, tmp_path)
    assert code == -signal.SIGTERM
    assert b"still here" in got
    # Never before the grace; about twice it (bounded generously for a busy machine).
    assert GRACE <= took < 2 * GRACE + 10
