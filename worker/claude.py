"""Runs the Claude Code CLI (or the replay program) and yields its output lines.

The CLI runs in its own process group so that everything it starts (shells,
test runners) can be signalled at once; stopping it is SIGINT to the group,
then SIGTERM, then SIGKILL, each after ``grace`` seconds, and afterwards no
process of the group remains. Output is read in chunks and split into lines
here (not with ``readline``) so a line of any length is bounded: an
over-long stdout line becomes an :class:`Oversize` item, never an exception.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import msgspec
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.memory import MemoryObjectSendStream

from progress_service.events import JobSpec
from progress_service.settings import Settings

T = TypeVar("T")

#: Longest stdout line decoded as stream-json (a bigger one is reported, not parsed).
MAX_LINE_BYTES = 1 << 20
#: Stderr lines are only logged, so they are cut much earlier.
MAX_STDERR_BYTES = 16 * 1024
_CHUNK = 64 * 1024


class Line(msgspec.Struct, frozen=True):
    """One complete output line (without its newline)."""

    stream: Literal["stdout", "stderr"]
    data: bytes


class Oversize(msgspec.Struct, frozen=True):
    """A line longer than the limit: its first bytes and its full size."""

    stream: Literal["stdout", "stderr"]
    head: bytes
    size: int


Output = Line | Oversize


class Command(msgspec.Struct, frozen=True):
    """The argv to start and whether it is the replay program (a demo)."""

    argv: list[str]
    demo: bool


def resolve_binary(settings: Settings) -> tuple[list[str], bool]:
    """The CLI's argv prefix and whether it is the replay program.

    ``settings.claude_bin`` wins, then ``claude`` on PATH, else the replay
    program shipped with the worker (``demo`` True). Decided here, in the
    worker that runs the job, never by the app that accepted it.
    """
    if settings.claude_bin:
        return [settings.claude_bin], False
    found = shutil.which("claude")
    if found:
        return [found], False
    return [sys.executable, "-m", "worker.replay"], True


def build_command(settings: Settings, spec: JobSpec, session_id: str) -> Command:
    """The full command line of one job, exactly as DESIGN.md describes it.

    There is no ``--cwd`` flag: the working directory is the subprocess cwd.
    ``--include-partial-messages`` makes the CLI print the API's stream
    events, the only place live output token counts appear.
    ``--allowedTools`` takes one argument per tool and comes last because it
    is variadic.
    """
    prefix, demo = resolve_binary(settings)
    argv = [
        *prefix, "-p", spec.prompt, "--output-format", "stream-json", "--verbose",
        "--include-partial-messages", "--session-id", session_id,
    ]
    if spec.model:
        argv += ["--model", spec.model]
    if spec.maxTurns:
        argv += ["--max-turns", str(spec.maxTurns)]
    if spec.permissionMode:
        argv += ["--permission-mode", spec.permissionMode]
    if spec.allowedTools:
        argv += ["--allowedTools", *spec.allowedTools]
    return Command(argv=argv, demo=demo)


def child_env(settings: Settings, spec: JobSpec | None = None) -> dict[str, str]:
    """The subprocess environment: ours, the replay knobs, and what the CLI needs here.

    Credentials (``ANTHROPIC_API_KEY``, ``CLAUDE_CODE_OAUTH_TOKEN``,
    ``ANTHROPIC_BASE_URL``) come from the worker's own environment. The
    CLI's auto-updater is off: the worker runs the version it was deployed
    with. As root the CLI refuses ``bypassPermissions``; only a worker
    declared a sandbox (``PS_CLAUDE_SANDBOX``) passes ``IS_SANDBOX=1``, and
    only to jobs that ask for that mode, so its refusal reaches the user
    everywhere else.
    """
    env = dict(os.environ)
    env["PS_REPLAY_SPEED"] = str(settings.replay_speed)
    if settings.replay_transcript:
        env["PS_REPLAY_TRANSCRIPT"] = settings.replay_transcript
    env.setdefault("DISABLE_AUTOUPDATER", "1")
    if spec is not None and spec.permissionMode == "bypassPermissions" and settings.claude_sandbox:
        env["IS_SANDBOX"] = "1"
    return env


def stdout_copy_path(settings: Settings, job_id: str, attempt: int) -> Path | None:
    """Where to keep a copy of the CLI's raw stdout (``PS_CLAUDE_STDOUT_DIR``), if anywhere."""
    if not settings.claude_stdout_dir:
        return None
    folder = Path(settings.claude_stdout_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job_id}.{attempt}.jsonl"


# --------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Zombies are left out: in a container PID 1 may never reap orphans, and a
    zombie is gone for every purpose that matters here.
    """
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: fall back to "is anyone there"
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces and parens.
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ClaudeProcess:
    """A started CLI process: its output, its exit, and how to stop it."""

    def __init__(self, process: Process, grace: float) -> None:
        self.process = process
        self.pid = process.pid
        # start_new_session makes the child the leader of a new group.
        self.pgid = process.pid
        self.grace = grace
        self._stopping = False
        self._stopped = anyio.Event()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def output(self) -> AsyncIterator[Output]:
        """Stdout and stderr lines, interleaved as they arrive, until both close."""
        send, receive = anyio.create_memory_object_stream[Output](64)
        async with anyio.create_task_group() as tg:
            assert self.process.stdout is not None and self.process.stderr is not None
            tg.start_soon(_pump, self.process.stdout, "stdout", MAX_LINE_BYTES, send.clone())
            tg.start_soon(_pump, self.process.stderr, "stderr", MAX_STDERR_BYTES, send.clone())
            send.close()
            async with receive:
                async for item in receive:
                    yield item

    async def wait(self) -> int:
        """Wait for the leader to exit; returns its exit code."""
        return await self.process.wait()

    async def _wait_gone(self, timeout: float) -> bool:
        """Poll until the leader is reaped and no group member is left."""
        with anyio.move_on_after(timeout):
            await self.process.wait()
            while group_members(self.pgid):
                await anyio.sleep(0.02)
            return True
        return False

    async def stop(self) -> None:
        """SIGINT, SIGTERM, SIGKILL to the group, ``grace`` seconds apart.

        Idempotent and safe to call concurrently: a second caller waits for
        the first one's escalation to finish. Returns when no process of the
        group remains.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        # Shielded: a caller cancelled half-way must not leave the group
        # half-signalled; the escalation is bounded (2 x grace + 5 s).
        with anyio.CancelScope(shield=True):
            await self._escalate()

    async def _escalate(self) -> None:
        try:
            for sig, wait in ((signal.SIGINT, self.grace), (signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
                if self.process.returncode is not None and not group_members(self.pgid):
                    break
                _signal_group(self.pgid, sig)
                if await self._wait_gone(wait):
                    break
        finally:
            self._stopped.set()

    async def reap_group(self) -> None:
        """After a normal exit, kill whatever the CLI left running in its group."""
        if group_members(self.pgid):
            await self.stop()


async def _pump(
    stream: ByteReceiveStream,
    name: Literal["stdout", "stderr"],
    limit: int,
    send: MemoryObjectSendStream[Output],
) -> None:
    """Split a byte stream into bounded lines."""
    buf = bytearray()
    skipping = 0  # >0: inside an over-long line, this many bytes seen so far
    head = b""
    async with send:
        try:
            async for chunk in stream:
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    if skipping:
                        await send.send(Oversize(stream=name, head=head, size=skipping + nl))
                        skipping = 0
                    else:
                        await send.send(Line(stream=name, data=bytes(buf[:nl]).rstrip(b"\r")))
                    del buf[: nl + 1]
                if len(buf) > limit or (skipping and buf):
                    if not skipping:
                        head = bytes(buf[:4096])
                    skipping += len(buf)
                    buf.clear()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        if skipping:
            await send.send(Oversize(stream=name, head=head, size=skipping + len(buf)))
        elif buf:
            await send.send(Line(stream=name, data=bytes(buf).rstrip(b"\r")))


@asynccontextmanager
async def start_claude(
    argv: Sequence[str], *, cwd: str | Path, env: Mapping[str, str] | None, grace: float
) -> AsyncIterator[ClaudeProcess]:
    """Start the CLI in ``cwd`` as a new process group; stop the group on exit.

    Leaving the context always leaves no process of the group behind, even
    when the caller is cancelled (the cleanup is shielded).
    """
    process = await anyio.open_process(
        list(argv),
        cwd=str(cwd),
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    proc = ClaudeProcess(process, grace)
    try:
        yield proc
    finally:
        await run_to_completion(_close(proc))


async def _close(proc: ClaudeProcess) -> None:
    await proc.stop()
    await proc.process.aclose()


async def run_to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` to its end even if the caller is cancelled, then re-raise the cancel.

    An anyio shield does not stop *native* asyncio cancellation, and arq
    delivers those (abort, shutdown, and ``asyncio.wait_for`` cancelling again
    when its own task is cancelled twice). Cleanup that must finish - killing
    a process group, publishing a final status - runs in its own task here
    and is waited for through every cancel. It must be bounded on its own.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
