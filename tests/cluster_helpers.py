"""A real 3-master Redis Cluster on free loopback ports, for tests and benchmarks.

Each node is a ``redis-server --cluster-enabled yes`` process started and
stopped by pid; a node can be killed and started again with the same
config file (its slots come back with it: there are no replicas).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path



def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000, at most 65535) is free too."""
    while True:
        port = random.randint(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port


def _answers(port: int, command: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(command)
            return s.recv(4096)
    except OSError:
        return b""


class Cluster:
    """The nodes of a local cluster; ``url`` names one of them (any node will do)."""

    def __init__(self, directory: Path, ports: list[int]) -> None:
        self.directory = directory
        self.ports = ports
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A URL naming the first node (the cluster client discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        """Start (or restart, with its old config file) the node on ``port``; wait until it answers."""
        log = open(self.directory / f"redis-{port}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs[port] = subprocess.Popen(
            [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000",
                # One failed shard must not stop the others (the default refuses every query).
                "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.directory),
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not _answers(port, b"PING\r\n").startswith(b"+PONG"):
            if time.monotonic() > deadline or self.procs[port].poll() is not None:
                tail = (self.directory / f"redis-{port}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"redis-server on {port} did not start: {tail}")
            time.sleep(0.02)

    def kill_node(self, port: int) -> None:
        """SIGKILL the node on ``port`` (its slots fail until it is started again)."""
        proc = self.procs.pop(port)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while True:
            if all(b"cluster_state:ok" in _answers(p, b"CLUSTER INFO\r\n") for p in self.ports):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill every node by pid."""
        for port in list(self.procs):
            self.kill_node(port)


def redis_server_available() -> bool:
    """redis-server and redis-cli are installed."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


@contextlib.contextmanager
def redis_cluster(directory: Path, masters: int = 3) -> Iterator[Cluster]:
    """A fresh ``masters``-node cluster (no replicas) in ``directory``; killed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(directory, [cluster_port() for _ in range(masters)])
    try:
        for port in cluster.ports:
            cluster.start_node(port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        cluster.wait_ok()
        yield cluster
    finally:
        cluster.stop()
