"""Runs the Claude Code CLI (or the replay program) and hands out its output lines.

The CLI runs in its own process group; stopping it is SIGINT to the group
(the CLI then prints its last lines), then SIGTERM, then SIGKILL to every
process of the run, each after ``grace`` seconds (SIGTERM waits up to
another ``grace`` while the CLI is still printing), and afterwards no process
of the run remains, not even one that called ``setsid()`` (see
:mod:`worker.proctree`). Output is read in chunks and split into lines
here (not with ``readline``) so a line of any length is bounded: an
over-long stdout line becomes an :class:`Oversize` item, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import msgspec
from anyio.abc import ByteReceiveStream, Process, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from progress_service.events import ASK_MODE, JobSpec
from progress_service.settings import Settings
from worker.proctree import TAG_VAR, ProcessTree, become_subreaper, group_members

__all__ = ["ClaudeProcess", "Command", "Line", "Output", "Oversize", "group_members", "start_claude", "user_message"]

T = TypeVar("T")

log = logging.getLogger("progress_service.worker")

#: Longest stdout line decoded as stream-json (a bigger one is reported, not parsed).
MAX_LINE_BYTES = 1 << 20
#: Stderr lines are only logged, so they are cut much earlier.
MAX_STDERR_BYTES = 16 * 1024
_CHUNK = 64 * 1024
_json = msgspec.json.Encoder()


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
    """The full command line of one job, exactly as docs/jobs.md describes it.

    The prompt is not an argument: with ``--input-format stream-json`` it is
    the first user message on stdin (:func:`user_message`), and
    instructions from the room follow it while the CLI runs;
    ``--replay-user-messages`` makes the CLI echo each one it takes, which is
    the delivery acknowledgement. Permission mode ``ask`` is the CLI's
    ``manual`` with every prompt handed to the worker over stdio
    (``--permission-prompt-tool stdio``: ``control_request`` on stdout,
    ``control_response`` on stdin).
    There is no ``--cwd`` flag: the working directory is the subprocess cwd.
    ``--include-partial-messages`` makes the CLI print the API's stream
    events, the only place live output token counts appear.
    ``--allowedTools`` takes one argument per tool and comes last because it
    is variadic.
    """
    prefix, demo = resolve_binary(settings)
    argv = [
        *prefix, "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
        "--replay-user-messages", "--include-partial-messages", "--session-id", session_id,
    ]
    if spec.model:
        argv += ["--model", spec.model]
    if spec.maxTurns:
        argv += ["--max-turns", str(spec.maxTurns)]
    if spec.permissionMode == ASK_MODE:
        argv += ["--permission-mode", "manual", "--permission-prompt-tool", "stdio"]
    elif spec.permissionMode:
        argv += ["--permission-mode", spec.permissionMode]
    if spec.allowedTools:
        argv += ["--allowedTools", *spec.allowedTools]
    return Command(argv=argv, demo=demo)


def user_message(text: str, message_uuid: str) -> bytes:
    """One stream-json user message for the CLI's stdin (the CLI echoes its ``uuid``)."""
    line = {
        "type": "user",
        "message": {"role": "user", "content": text},
        "uuid": message_uuid,
        "parent_tool_use_id": None,
        "session_id": "",
    }
    return _json.encode(line) + b"\n"


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
# The running CLI
# --------------------------------------------------------------------------


class ClaudeProcess:
    """A started CLI process: its output, its exit, and how to stop it and all it started."""

    def __init__(self, process: Process, grace: float, tag: str) -> None:
        self.process = process
        self.pid = process.pid
        # start_new_session makes the child the leader of a new group.
        self.pgid = process.pid
        self.grace = grace
        self.tree = ProcessTree(process.pid, tag)
        self._stopping = False
        self._stopped = anyio.Event()
        self._stdin_lock = anyio.Lock()
        #: When output last moved: a chunk read or a line taken (``anyio.current_time()``).
        self.last_output = 0.0

    def _saw_output(self) -> None:
        self.last_output = anyio.current_time()

    async def write(self, data: bytes) -> bool:
        """Write to the CLI's stdin, one writer at a time; False once stdin is closed or broken."""
        stdin = self.process.stdin
        if stdin is None:
            return False
        async with self._stdin_lock:
            try:
                await stdin.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return False
        return True

    async def close_stdin(self) -> None:
        """End the CLI's input (it then ends after its current turn)."""
        if self.process.stdin is not None:
            async with self._stdin_lock:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self.process.stdin.aclose()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def start_output(self, tg: TaskGroup) -> MemoryObjectReceiveStream[Output]:
        """Start reading stdout and stderr in ``tg``; returns their lines, interleaved.

        The two pump tasks belong to the caller's task group (not to a
        generator's), so the consumer never yields from inside a cancel
        scope. The stream ends when both pipes are closed.
        """
        assert self.process.stdout is not None and self.process.stderr is not None
        send, receive = anyio.create_memory_object_stream[Output](64)
        with send:
            tg.start_soon(_pump, self.process.stdout, "stdout", MAX_LINE_BYTES, send.clone(), self._saw_output)
            tg.start_soon(_pump, self.process.stderr, "stderr", MAX_STDERR_BYTES, send.clone(), self._saw_output)
        return receive

    async def wait(self) -> int:
        """Wait for the leader to exit; returns its exit code."""
        return await self.process.wait()

    async def _wait_gone(self, timeout: float) -> bool:
        """Poll until the leader is reaped and no process of the run is left."""
        with anyio.move_on_after(timeout):
            await self.process.wait()
            while self.tree.members():
                await anyio.sleep(0.05)
            return True
        return False

    async def _wait_gone_while_printing(self, quiet: float) -> bool:
        """Like :meth:`_wait_gone`, until ``quiet`` seconds pass without output (``2 * quiet`` at most).

        After SIGINT the CLI prints its last lines, its cost among them. A
        worker that is behind on reading (a busy machine, many jobs) keeps
        the pipe full, so the CLI can still be waiting to write them when
        ``quiet`` seconds are up: a SIGTERM then would lose the very lines
        the SIGINT asked for. Output still being read, or lines still being
        taken by the reader, is progress, not a stuck CLI.
        """
        start = anyio.current_time()
        while True:
            now = anyio.current_time()
            due = min(start + 2 * quiet, max(start, self.last_output) + quiet)
            if due <= now:
                return False
            if await self._wait_gone(due - now):
                return True

    async def stop(self) -> None:
        """End the run: SIGINT to the CLI's group, then SIGTERM, then SIGKILL to every process of the run.

        SIGINT goes to the group only, like a terminal's Ctrl-C: the CLI then
        stops its tools and prints its last lines (a ``result`` with the
        cost). SIGTERM follows ``grace`` seconds later, or up to ``2 * grace``
        while the CLI's output is still arriving; SIGKILL ``grace`` seconds
        after that. Both reach every process of the run
        (:class:`ProcessTree`), setsid'ed ones included.
        Idempotent and safe to call concurrently: a second caller waits for
        the first one's escalation to finish. Returns when no process of the
        run remains.
        """
        await self._escalate(((signal.SIGINT, self.grace), (signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)))

    async def reap_group(self) -> None:
        """After the CLI exited, end whatever it left running (SIGTERM, then SIGKILL)."""
        await self.wait()
        if self.tree.members():
            await self._escalate(((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)))

    async def _escalate(self, steps: Sequence[tuple[signal.Signals, float]]) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        # Shielded: a caller cancelled half-way must not leave the run
        # half-signalled; the escalation is bounded (3 x grace + 5 s).
        with anyio.CancelScope(shield=True):
            try:
                started = anyio.current_time()
                for n, (sig, wait) in enumerate(steps):
                    if self.process.returncode is not None and not self.tree.members():
                        break
                    if n:  # the operator should know a run did not end on the first signal
                        log.warning("the CLI's run (pid %d) was still there %.1f s after %s; sending %s",
                                    self.pid, anyio.current_time() - started, steps[0][0].name, sig.name)
                    self.tree.send(sig, group_only=sig == signal.SIGINT)
                    gone = self._wait_gone_while_printing(wait) if sig == signal.SIGINT else self._wait_gone(wait)
                    if await gone:
                        break
            finally:
                self.tree.reap()
                self._stopped.set()


async def _pump(
    stream: ByteReceiveStream,
    name: Literal["stdout", "stderr"],
    limit: int,
    send: MemoryObjectSendStream[Output],
    saw_output: Callable[[], None],
) -> None:
    """Split a byte stream into bounded lines (``saw_output`` is called per chunk read and per line taken)."""
    buf = bytearray()
    skipping = 0  # >0: inside an over-long line, this many bytes seen so far
    head = b""
    async with send:
        try:
            async for chunk in stream:
                saw_output()
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
                    saw_output()  # the reader took a line: output is moving
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
    """Start the CLI in ``cwd`` as a new process group; stop the run on exit.

    Leaving the context always leaves no process of the run behind (its
    group, its descendants and its tagged escapees, see
    :mod:`worker.proctree`), even when the caller is cancelled (the cleanup
    runs to completion).
    """
    become_subreaper()
    tag = uuid.uuid4().hex
    process = await anyio.open_process(
        list(argv),
        cwd=str(cwd),
        env={**(os.environ if env is None else env), TAG_VAR: tag},
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    proc = ClaudeProcess(process, grace, tag)
    try:
        yield proc
    finally:
        await run_to_completion(_close(proc))


async def _close(proc: ClaudeProcess) -> None:
    await proc.stop()
    await proc.process.aclose()
    proc.tree.reap()


async def run_to_completion(coro: Coroutine[Any, Any, T] | asyncio.Future[T]) -> T:
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
