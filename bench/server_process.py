"""A server under test as a subprocess: started on a free port (optionally pinned), stopped by pid.

The seed's peer (``bench/peer.py``) and uvicorn's floor (``bench/floor.py``)
are both run this way; the project itself is :class:`bench.service.Service`,
which also owns its Redis and store.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from bench import stats
from bench.orchestra import log
from progress_service.embedded_redis import free_port, wait_for_port


class ServerProcess:
    """One server process on :attr:`port`, optionally pinned to ``cpus``; SIGTERM, then SIGKILL after 10 s."""

    def __init__(self, *, cpus: set[int] | None = None) -> None:
        self.cpus = cpus
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path,
              output: IO[bytes] | None = None, timeout: float = 30.0) -> None:
        """Start ``cmd`` in its own session and wait until the port answers (stopped again if it does not)."""
        cpus = self.cpus
        try:
            self.proc = subprocess.Popen(
                list(cmd), env=dict(env), cwd=cwd, stdout=output, stderr=subprocess.STDOUT if output else None,
                start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
            wait_for_port("127.0.0.1", self.port, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        log(f"{name} pid {self.proc.pid} on port {self.port}")

    def stop(self) -> None:
        """Stop the process if it runs (and reap it)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    @property
    def pid(self) -> int:
        """The server's pid (once started)."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        """CPU seconds the server has used (all its threads)."""
        return stats.cpu_seconds(self.pid)

    def rss(self) -> int:
        """The server's resident memory in bytes."""
        return stats.rss_bytes(self.pid)
