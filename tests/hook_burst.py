"""Post a burst of Claude Code hooks from a process of its own; prints what it measured as JSON.

``python tests/hook_burst.py PORT TOKEN SESSIONS PER_SESSION``: every
session's hooks (a prompt, a notification, then PreToolUse/PostToolUse
pairs) go out on two keep-alive connections, one with its even hooks and one
with its odd ones, so each PostToolUse races its PreToolUse. The client is a
few lines of asyncio on raw sockets: an HTTP library's own CPU would be most
of what a burst measures on a small machine.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hook_helpers import HOOK_PATH, Session  # noqa: E402


def session_bodies(s: Session, n: int) -> list[dict[str, Any]]:
    """``n`` hooks of one session (``n`` even): a prompt, a notification, then tool pre/post pairs."""
    bodies = [s.body("UserPromptSubmit", prompt="Refactor the parser"), s.body("Notification", message="working")]
    for i in range((n - 2) // 2):
        tool_input = {"command": f"pytest tests/test_{i}.py -q"}
        bodies.append(s.pre(f"toolu_{i}", "Bash", tool_input))
        bodies.append(s.post(f"toolu_{i}", "Bash", tool_input, {"stdout": "1 passed", "stderr": "", "interrupted": False}))
    return bodies


async def _lane(port: int, token: str, bodies: list[dict[str, Any]], times: list[float], codes: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for body in bodies:
            data = json.dumps(body).encode()
            head = (
                f"POST {HOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"X-PS-Host: burst\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            started = time.perf_counter()
            writer.write(head.encode() + data)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            times.append((time.perf_counter() - started) * 1000)
            codes.append(int(status.split()[1]))
    finally:
        writer.close()


async def burst(port: int, token: str, sessions: list[Session], per_session: int) -> dict[str, Any]:
    """Post every session's hooks; returns the count, rate and answer-time percentiles."""
    lanes = [lane for s in sessions for b in [session_bodies(s, per_session)] for lane in (b[0::2], b[1::2])]
    times: list[float] = []
    codes: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*(_lane(port, token, lane, times, codes) for lane in lanes))
    seconds = time.perf_counter() - started
    times.sort()
    return {
        "posts": len(times),
        "connections": len(lanes),
        "seconds": round(seconds, 3),
        "per_second": round(len(times) / seconds),
        "p50_ms": round(times[len(times) // 2], 1),
        "p99_ms": round(times[int(len(times) * 0.99)], 1),
        "codes": {str(c): codes.count(c) for c in sorted(set(codes))},
    }


if __name__ == "__main__":
    port, token, n_sessions, per = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ids = sys.argv[5].split(",")
    print(json.dumps(asyncio.run(burst(port, token, [Session(i) for i in ids[:n_sessions]], per))))
