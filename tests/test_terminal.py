"""The terminal follower (``progress-service submit`` / ``watch``) against a real service.

The multi-process tests start ``progress-service serve`` and ``progress-service
worker`` as subprocesses on the test's Redis and SQLite store (jobs run the
replay program), and run the real console entry as a subprocess with its
output piped, so it prints one plain line per event.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from progress_service.embedded_redis import embedded_redis
from progress_service.events import ChatMsg, EventMsg
from progress_service.keys import events_key
from progress_service.terminal.backoff import Backoff
from progress_service.terminal.client import Outcome, ws_url
from progress_service.terminal.describe import format_chat, format_event, one_line

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = shutil.which("progress-service", path=str(Path(sys.executable).parent)) or "progress-service"


# --------------------------------------------------------------------------
# A CLI subprocess whose output is read as it comes
# --------------------------------------------------------------------------


class Cli:
    """``progress-service ARGS`` with stdout/stderr piped and collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [CONSOLE, *args],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until ``pred()`` holds (checked on every new output line)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)):
                    if pred():
                        return
                    raise AssertionError(f"condition not met; stdout={self.out[-20:]} stderr={self.err[-20:]}")
                self._cond.wait(min(remaining, 0.5))

    def wait(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"CLI did not exit; stdout={self.out[-20:]} stderr={self.err[-20:]}") from None
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def job_id(self) -> str:
        for line in self.err:
            if line.startswith("progress-service: submitted job "):
                return line.split()[3]
        raise AssertionError(f"no job id in stderr: {self.err}")


def cli_env(url: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PS_URL"] = url
    if token is not None:
        env["PS_TOKEN"] = token
    return env


@pytest.fixture
def run_cli() -> Any:
    started: list[Cli] = []

    def start(args: list[str], env: dict[str, str]) -> Cli:
        cli = Cli(args, env)
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.kill()


def job_events(url: str, token: str, job_id: str) -> list[dict[str, Any]]:
    """Every retained item of the job's room, from the HTTP API."""
    items: list[dict[str, Any]] = []
    since: str | None = None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if since:
                params["since"] = since
            page = client.get(f"/api/jobs/{job_id}/events", params=params).raise_for_status().json()
            items += page["items"]
            if not page["items"]:
                return items
            since = page["next"]


def job_status(url: str, token: str, job_id: str) -> str:
    r = httpx.get(f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    return r.raise_for_status().json()["status"]


def submit_job(url: str, token: str, prompt: str) -> str:
    r = httpx.post(f"{url}/api/jobs", json={"prompt": prompt}, headers={"Authorization": f"Bearer {token}"})
    return r.raise_for_status().json()["id"]


def assert_lines_match_events(lines: list[str], items: list[dict[str, Any]]) -> None:
    """One plain line per event or comment, in the room's order, nothing else."""
    kinds = [line.split()[1] for line in lines]
    expected = [item["kind"] if item["type"] == "event" else "comment" for item in items]
    assert kinds == expected, f"\nlines:  {kinds}\nevents: {expected}"
    # Line by line, exactly what the renderer makes of each retained item.
    formatted = [
        format_event(msgspec.convert(item, EventMsg)) if item["type"] == "event" else format_chat(msgspec.convert(item, ChatMsg))
        for item in items
    ]
    assert lines == formatted
    # Every step transition exactly once (the retained log itself has no duplicates).
    steps = [(i["data"]["stepId"], i["data"]["state"], i.get("attempt", 1)) for i in items if i.get("kind") == "step"]
    assert steps and len(steps) == len(set(steps))


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def private_redis_url() -> Any:
    """A real redis-server of this module's own.

    The arq queue name is fixed, so on the shared Redis a worker started by
    another test run (another engineer's, or a parallel one) can take this
    test's jobs and leave them queued forever here.
    """
    with embedded_redis() as url:
        yield url


@pytest.fixture
async def service(make_settings: Any, make_token: Any, server_process: Any, private_redis_url: str) -> Any:
    """A real serve + worker pair and a submitter token: ``(settings, serve, token)``."""

    async def start(**overrides: Any) -> tuple[Any, Any, str]:
        settings = make_settings(redis_url=private_redis_url, **overrides)
        token = await make_token(role="submitter")
        serve = server_process(settings, "serve")
        server_process(settings, "worker")
        return settings, serve, token

    return start


# --------------------------------------------------------------------------
# Pure parts: no processes
# --------------------------------------------------------------------------


def test_backoff_is_full_jitter_capped_and_resets_only_after_a_stable_connection() -> None:
    b = Backoff(rng=random.Random(7))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        assert 0 <= b.next_delay() <= ceilings[-1]
    assert ceilings[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(ceilings) == 20.0
    # A connection that drops after 3 s does not reset the counter ...
    b.connected(now=100.0)
    b.disconnected(now=103.0)
    assert b.ceiling() == 20.0
    # ... one that stayed up for 10 s does.
    b.connected(now=200.0)
    b.disconnected(now=210.0)
    assert b.ceiling() == 0.5
    assert 10.0 <= b.long_delay() <= 20.0
    # No overflow after very many attempts.
    b.attempt = 100_000
    assert b.ceiling() == 20.0


def test_ws_url_keeps_host_and_prefix_and_drops_query() -> None:
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/ws"
    assert ws_url("https://ps.example.com/prefix/?token=x#frag") == "wss://ps.example.com/prefix/ws"
    with pytest.raises(ValueError):
        ws_url("ftp://x")


def test_plain_lines_stay_on_one_line() -> None:
    msg = EventMsg(roomId="job:a", id="1-0", kind="message", at=0, data={"text": "two\nlines\r\n\x1b[2Jand an escape"})
    line = format_event(msg)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.split()[1] == "message"
    assert len(one_line("x" * 5000)) == 300
    unknown = format_event(EventMsg(roomId="job:a", id="1-1", kind="newkind", at=0, data={"a": [1]}))
    assert unknown.split()[1] == "newkind" and '{"a":[1]}' in unknown


def test_outcome_exit_codes() -> None:
    assert Outcome(status="succeeded").exit_code == 0
    assert Outcome(status="failed").exit_code == 1
    assert Outcome(status="cancelled").exit_code == 1


def test_missing_token_and_bad_url_are_usage_errors(run_cli: Any) -> None:
    cli = run_cli(["watch", "abc"], cli_env("http://127.0.0.1:9", None))
    assert cli.wait() == 2
    assert any("no API token" in line for line in cli.err)
    cli = run_cli(["watch", "abc", "--url", "ftp://x", "--token", "t"], cli_env("http://127.0.0.1:9", None))
    assert cli.wait() == 2
    cli = run_cli(["watch", "abc", "--token", "t"], cli_env("http://127.0.0.1:9", None))
    assert cli.wait() == 2
    assert any("cannot reach http://127.0.0.1:9" in line for line in cli.err)
    assert not any("Traceback" in line for line in cli.err)


# --------------------------------------------------------------------------
# Against a real service
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_submit_follow_prints_one_line_per_event_and_exits_0(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service()
    cli = run_cli(["submit", "add a health check", "--follow"], cli_env(serve.url, token))
    assert cli.wait() == 0, cli.err
    items = job_events(serve.url, token, cli.job_id)
    assert_lines_match_events(cli.out, items)
    assert cli.out[-1].split()[1:3] == ["status", "succeeded"]
    assert any(line.split()[1] == "result" for line in cli.out)
    assert not any(token in line for line in cli.out + cli.err)

    # Watching a finished job replays its retained events, then ends.
    again = run_cli(["watch", cli.job_id], cli_env(serve.url, token))
    assert again.wait() == 0, again.err
    assert again.out == cli.out


@pytest.mark.slow
async def test_submit_follow_exits_1_on_the_failure_transcript(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service()
    cli = run_cli(["submit", "[fail] break the build", "--follow"], cli_env(serve.url, token))
    assert cli.wait() == 1, cli.err
    assert_lines_match_events(cli.out, job_events(serve.url, token, cli.job_id))
    assert cli.out[-1].split()[1:3] == ["status", "failed"]


@pytest.mark.slow
async def test_submit_without_follow_prints_the_job_id(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service()
    cli = run_cli(["submit", "quick one", "--max-turns", "3"], cli_env(serve.url, token))
    assert cli.wait() == 0, cli.err
    assert len(cli.out) == 1 and len(cli.out[0]) >= 8
    assert job_status(serve.url, token, cli.out[0]) in ("queued", "running", "succeeded")
    assert any(f"job:{cli.out[0]}" in line for line in cli.err)


@pytest.mark.slow
async def test_http_errors_exit_2_with_a_message(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service()
    bogus = "pst_not-a-real-token-0123456789"
    for args in (["watch", "0123abcd", "--token", bogus], ["submit", "x", "--follow", "--token", bogus]):
        cli = run_cli(args, cli_env(serve.url, token))
        assert cli.wait() == 2
        err = "\n".join(cli.err)
        assert "HTTP 401" in err and "token" in err
        assert "Traceback" not in err and bogus not in err + "\n".join(cli.out)

    cli = run_cli(["watch", "nosuchjob"], cli_env(serve.url, token))
    assert cli.wait() == 2
    assert any("HTTP 404" in line for line in cli.err), cli.err

    cli = run_cli(["submit", "x", "--workdir", "../../etc"], cli_env(serve.url, token))
    assert cli.wait() == 2
    assert any("HTTP 400" in line and "workdir" in line.lower() for line in cli.err), cli.err
    assert not any("Traceback" in line for line in cli.err)


@pytest.mark.slow
async def test_watch_resumes_after_the_server_restarts(service: Any, run_cli: Any, server_process: Any) -> None:
    # The long transcript lasts ~40 s at 1x; at 4x the job runs ~10 s.
    settings, serve, token = await service(replay_speed=4.0)
    job_id = submit_job(serve.url, token, "[long] refactor the parser")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    cli.wait_for(lambda: sum(1 for line in cli.out if line.split()[1] == "step") >= 3)
    assert job_status(serve.url, token, job_id) == "running"

    serve.stop()  # graceful: 1001 server restarting
    server_process(settings, "serve", port=serve.port)

    assert cli.wait(timeout=90) == 0, cli.err
    err = "\n".join(cli.err)
    assert "connection lost" in err and "reconnected" in err
    assert_lines_match_events(cli.out, job_events(serve.url, token, job_id))
    assert cli.out[-1].split()[1:3] == ["status", "succeeded"]


@pytest.mark.slow
async def test_ctrl_c_exits_130_and_the_job_keeps_running(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service(replay_speed=8.0)
    job_id = submit_job(serve.url, token, "[long] keep going")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    cli.wait_for(lambda: any(line.split()[1] == "step" for line in cli.out))
    cli.proc.send_signal(signal.SIGINT)
    assert cli.wait(timeout=20) == 130
    err = "\n".join(cli.err)
    assert "keeps running" in err and "Traceback" not in err
    wait_until(lambda: job_status(serve.url, token, job_id) != "running", timeout=60, what="the job to end")
    assert job_status(serve.url, token, job_id) == "succeeded"


@pytest.mark.slow
async def test_ctrl_c_with_cancel_on_exit_cancels_the_job(service: Any, run_cli: Any) -> None:
    settings, serve, token = await service(replay_speed=2.0)
    cli = run_cli(["submit", "[long] stop me", "--follow", "--cancel-on-exit"], cli_env(serve.url, token))
    cli.wait_for(lambda: any(line.split()[1] == "step" for line in cli.out))
    cli.proc.send_signal(signal.SIGINT)
    assert cli.wait(timeout=20) == 130
    assert any("cancel requested" in line for line in cli.err), cli.err
    wait_until(lambda: job_status(serve.url, token, cli.job_id) == "cancelled", timeout=30, what="the cancel")


@pytest.mark.slow
async def test_on_a_terminal_it_draws_a_live_panel(service: Any) -> None:
    import pty  # noqa: PLC0415 - POSIX only, like the rest of these tests

    settings, serve, token = await service()
    master, slave = pty.openpty()
    env = cli_env(serve.url, token) | {"TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen(
        [CONSOLE, "submit", "draw it", "--follow"], env=env, cwd=str(ROOT), stdout=slave, stderr=subprocess.PIPE
    )
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: _drain(master, chunks), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    assert "\x1b[" in screen  # redrawn in place, with colours
    for text in ("to-dos", "phase", "cost", "✓", "succeeded"):
        assert text in screen, text
    assert "Traceback" not in screen


def _drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the child closed the terminal
            return
        if not data:
            return
        into.append(data)


@pytest.mark.slow
async def test_a_silent_server_trips_the_heartbeat_watchdog(service: Any, run_cli: Any, server_process: Any) -> None:
    # heartbeatMs = 1000: a connection silent for 2 s is dead to the client.
    settings, serve, token = await service(replay_speed=4.0, ws_heartbeat=1.0)
    job_id = submit_job(serve.url, token, "[long] freeze the server")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    cli.wait_for(lambda: sum(1 for line in cli.out if line.split()[1] == "step") >= 3)

    # A frozen server keeps its TCP connections open but says nothing:
    # only the client's watchdog can notice.
    os.killpg(serve.proc.pid, signal.SIGSTOP)
    try:
        cli.wait_for(lambda: any("heartbeat missed" in line for line in cli.err), timeout=15)
    finally:
        os.killpg(serve.proc.pid, signal.SIGKILL)
    serve.stop()
    server_process(settings, "serve", port=serve.port)

    assert cli.wait(timeout=90) == 0, cli.err
    assert_lines_match_events(cli.out, job_events(serve.url, token, job_id))


@pytest.mark.slow
async def test_a_trimmed_stream_is_resumed_from_the_archive(service: Any, run_cli: Any, server_process: Any) -> None:
    # Retain only a few events in Redis, so those published while the client
    # is away are trimmed before it comes back: the rejoin reads them from the
    # store's archive instead, so there is no gap and nothing is missed.
    settings, serve, token = await service(replay_speed=4.0, events_maxlen=5, events_keep_seconds=0)
    job_id = submit_job(serve.url, token, "[long] outrun the client")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    cli.wait_for(lambda: sum(1 for line in cli.out if line.split()[1] == "step") >= 2)
    serve.stop()
    # Wait until every entry the client can have seen was trimmed away.
    from redis import Redis  # noqa: PLC0415

    from progress_service.streams import id_lt  # noqa: PLC0415

    r = Redis.from_url(settings.redis_url, decode_responses=True)
    key = events_key(job_id)
    try:
        seen_up_to = r.xinfo_stream(key)["last-generated-id"]
        wait_until(lambda: id_lt(seen_up_to, r.xrange(key, count=1)[0][0]), timeout=30, what="the trim")
    finally:
        r.close()
    server_process(settings, "serve", port=serve.port)

    assert cli.wait(timeout=90) == 0, cli.err
    assert not any("missed events" in line for line in cli.err), cli.err
    assert cli.out[-1].split()[1:3] == ["status", "succeeded"]
    assert_lines_match_events(cli.out, job_events(serve.url, token, job_id))


@pytest.mark.slow
async def test_comments_are_printed_as_they_arrive(service: Any, run_cli: Any, make_token: Any) -> None:
    import json  # noqa: PLC0415

    import websockets  # noqa: PLC0415

    settings, serve, token = await service(replay_speed=8.0)
    reviewer = await make_token(role="reviewer", user="rita")
    job_id = submit_job(serve.url, token, "[long] review me")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    cli.wait_for(lambda: any(line.split()[1] == "step" for line in cli.out))

    async with websockets.connect(ws_url(serve.url)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": reviewer}))
        assert json.loads(await ws.recv())["type"] == "auth_ok"
        await ws.send(json.dumps({"type": "join", "roomId": f"job:{job_id}"}))
        await ws.send(json.dumps({"type": "chat", "roomId": f"job:{job_id}", "requestId": "r1", "text": "line one\nline two"}))
        while json.loads(await ws.recv())["type"] != "ack":
            pass

    cli.wait_for(lambda: any(line.split()[1] == "comment" for line in cli.out))
    assert cli.wait(timeout=60) == 0, cli.err
    comment = next(line for line in cli.out if line.split()[1] == "comment")
    assert comment.endswith("rita: line one line two")
    assert_lines_match_events(cli.out, job_events(serve.url, token, job_id))


@pytest.mark.slow
async def test_credentials_are_refreshed_before_they_expire(service: Any, run_cli: Any) -> None:
    # Connections must re-send auth every 3 s, or the server closes them 4401.
    settings, serve, token = await service(replay_speed=5.0, ws_credential_ttl=3)
    job_id = submit_job(serve.url, token, "[long] take your time")
    cli = run_cli(["watch", job_id], cli_env(serve.url, token))
    assert cli.wait(timeout=60) == 0, cli.err
    assert not any("connection lost" in line for line in cli.err), cli.err
    assert_lines_match_events(cli.out, job_events(serve.url, token, job_id))


def test_retries_and_notices_are_shown_and_the_retry_state_clears() -> None:
    from progress_service.terminal.render import JobView  # noqa: PLC0415

    retry = {"attempt": 3, "maxRetries": 10, "delayMs": 8000, "errorStatus": 529, "error": "overloaded",
             "text": "retrying the API (3/10, 529 overloaded, next in 8 s)"}
    line = format_event(EventMsg(roomId="job:j", id="1-0", kind="retry", at=0, data=retry))
    assert line.split(None, 1)[1] == "retry    retrying the API (3/10, 529 overloaded, next in 8 s)"
    notice = {"kind": "permission_denied", "text": "permission denied: Bash: rm -rf build"}
    assert "permission_denied: permission denied: Bash: rm -rf build" in format_event(
        EventMsg(roomId="job:j", id="2-0", kind="notice", at=0, data=notice)
    )
    view = JobView("j")
    view.apply_event("retry", retry)
    assert view.retry == retry["text"]
    view.apply_event("usage", {"inputTokens": 10, "outputTokens": 1})
    assert view.retry == ""
