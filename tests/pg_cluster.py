"""A private PostgreSQL cluster for tests that stop and start the store.

The shared server on 5432 is never stopped: a fault test runs its own
cluster (``initdb`` + ``pg_ctl``) on a free port in a temp dir, as the
``postgres`` user when run as root (PostgreSQL refuses to run as root), and
stops it itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from progress_service.embedded_redis import free_port


class PgCluster:
    """``initdb`` once, then :meth:`start` / :meth:`stop` as often as a test likes."""

    def __init__(self, root: Path, port: int, user: str | None) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self._user = user
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        kw: dict[str, Any] = {"user": self._user} if self._user else {}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")

    def init(self) -> None:
        self._run(
            _bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stop it the way an operator's restart does (``fast``: sessions are ended)."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


def _bin(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(name)
    return found


def available() -> str | None:
    """None when a private cluster can be made here, else why not."""
    for name in ("initdb", "pg_ctl"):
        if shutil.which(name) is None:
            return f"{name} is not on PATH"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run PostgreSQL as"
    return None


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A started private cluster; stopped (if running) and deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ps-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = PgCluster(root, free_port(), user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            with contextlib.suppress(Exception):
                cluster._run(_bin("pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
