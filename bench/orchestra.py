"""Starting, pacing and collecting the load-generator and publisher processes."""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from bench.control import STOP, Control, spawn_context
from bench.loadgen import ClientSpec, WorkerConfig, worker_main
from bench.publisher import PublisherConfig, publisher_main
from bench.stats import Histogram

_T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries only results)."""
    print(f"[bench {time.monotonic() - _T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A scenario could not run (server died, clients refused, timeout)."""


def split(clients: list[ClientSpec], workers: int) -> list[list[ClientSpec]]:
    """Deal clients round-robin over ``workers`` processes (each room spread over all of them)."""
    return [clients[i::workers] for i in range(workers)]


class Orchestra:
    """The processes of one scenario. Use as a context manager; everything is stopped on exit."""

    def __init__(self, workers: list[WorkerConfig], publisher: PublisherConfig | None, rooms: int) -> None:
        self.ctx = spawn_context()
        self.ctl = Control(self.ctx, len(workers), rooms)
        self.worker_cfgs = workers
        self.pub_cfg = publisher
        self.procs: list[BaseProcess] = []
        self.pub_proc: BaseProcess | None = None
        self.results: dict[str, object] = {}
        self.total_clients = sum(len(w.clients) for w in workers)
        #: CPU seconds of redis-server during the measured phase (set by the scenario).
        self.redis_cpu: float | None = None
        #: The server's counters per second during the measured phase (set by the scenario).
        self.server_rates: dict[str, float] = {}

    def __enter__(self) -> Orchestra:
        for i, cfg in enumerate(self.worker_cfgs):
            p = self.ctx.Process(target=worker_main, args=(i, cfg, self.ctl), name=f"bench-loadgen-{i}", daemon=True)
            p.start()
            self.procs.append(p)
        self.wait(lambda: all(self.ctl.ready[i] for i in range(len(self.procs))), 60, "load generators to start")
        log(f"{len(self.procs)} load generators ready for {self.total_clients} clients")
        return self

    def __exit__(self, *exc: object) -> None:
        log("stopping load generators")
        self.ctl.phase.value = STOP
        self.ctl.pub_stop.value = 1
        for p in [*self.procs, *([self.pub_proc] if self.pub_proc else [])]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()  # by pid: only our own children
                p.join(timeout=5)
        log("load generators stopped")

    # -- pacing -------------------------------------------------------------

    def go(self) -> float:
        """Let clients connect; returns the wall-clock start."""
        t = time.time()
        self.ctl.go.value = 1
        return t

    def start_publisher(self, timeout: float = 60.0) -> float:
        """Start the publisher process and wait until it is ready to publish; returns how long that took.

        Spawning it and importing its path (the worker's Publisher, SQLAlchemy,
        the store) takes seconds on a loaded machine: a phase opened before
        that would measure a publisher that has not published yet.
        """
        assert self.pub_cfg is not None
        self.pub_proc = self.ctx.Process(
            target=publisher_main, args=(self.pub_cfg, self.ctl, len(self.procs)), name="bench-publisher", daemon=True
        )
        self.pub_proc.start()
        took = self.wait(lambda: bool(self.ctl.pub_ready.value), timeout, "the publisher to start", self._publisher_alive)
        log(f"publisher ready in {took:.2f}s")
        return took

    def wait_first_delivery(self, timeout: float = 60.0) -> float:
        """Closed loop: wait until every watcher has seen the publisher's first event (call in WARMUP).

        The warm-up then starts with the whole pipeline (publisher -> Redis ->
        hub -> every connection) flowing, not with its first round trip.
        """
        n = len(self.procs)
        took = self.wait(lambda: min(self.ctl.progress[i] for i in range(n)) >= 1, timeout,
                         "the first event to reach every watcher", self._publisher_alive)
        log(f"first event reached every watcher in {took:.2f}s")
        return took

    def _publisher_alive(self) -> None:
        if self.pub_proc is not None and not self.pub_proc.is_alive():
            self._drain()
            raise BenchError(f"the publisher exited: {self._crash() or f'exit code {self.pub_proc.exitcode}'}")

    def phase(self, value: int) -> None:
        self.ctl.phase.value = value

    def wait(self, cond: Callable[[], bool], timeout: float, what: str, check: Callable[[], None] | None = None) -> float:
        """Poll ``cond`` until true; raise BenchError naming ``what`` on timeout or a dead process."""
        start = time.monotonic()
        while not cond():
            for p in self.procs:
                if not p.is_alive():
                    self._drain()
                    raise BenchError(f"load generator {p.name} exited while waiting for {what}: {self._crash()}")
            if check is not None:
                check()
            if time.monotonic() - start > timeout:
                raise BenchError(f"timed out after {timeout}s waiting for {what} ({self.status()})")
            time.sleep(0.01)
        return time.monotonic() - start

    def joined(self) -> int:
        return sum(self.ctl.joined[i] for i in range(len(self.procs)))

    def failed(self) -> int:
        return sum(self.ctl.failed[i] for i in range(len(self.procs)))

    def rejoined(self) -> int:
        return sum(self.ctl.rejoined[i] for i in range(len(self.procs)))

    def caught_up(self) -> int:
        return sum(self.ctl.caught_up[i] for i in range(len(self.procs)))

    def status(self) -> str:
        return (f"joined {self.joined()}/{self.total_clients}, failed {self.failed()}, "
                f"rejoined {self.rejoined()}, caught up {self.caught_up()}")

    def wait_joined(self, timeout: float) -> float:
        def no_failures() -> None:
            if self.failed():
                status = self.status()
                try:
                    merged = self.stop_and_collect(timeout=20)
                    why = f"; e.g. {merged['failures'][:3]}, closes {merged['closes']}"
                except BenchError as exc:
                    why = f"; {exc}"
                raise BenchError(f"clients failed to join: {status}{why}")

        took = self.wait(lambda: self.joined() >= self.total_clients, timeout, "all clients to join", no_failures)
        log(f"{self.total_clients} clients joined in {took:.2f}s")
        return took

    # -- results ------------------------------------------------------------

    def stop_and_collect(self, timeout: float = 60.0) -> dict:
        """Enter STOP and gather every process's report."""
        self.ctl.pub_stop.value = 1
        self.ctl.phase.value = STOP
        want = len(self.procs) + (1 if self.pub_proc else 0)
        deadline = time.monotonic() + timeout
        workers: list[dict] = []
        pub: dict | None = None
        while len(workers) + (1 if pub is not None else 0) < want:
            try:
                kind, res = self.ctl.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError("load generators did not report in time") from None
            if kind == "publisher":
                pub = res
            else:
                workers.append(res)
        log("results collected")
        crashes = [w["crash"] + "\n" + w.get("trace", "") for w in workers if "crash" in w]
        if pub and "crash" in pub:
            crashes.append("publisher: " + pub["crash"] + "\n" + pub.get("trace", ""))
        if crashes:
            raise BenchError("; ".join(crashes))
        return merge(workers, pub)

    def _drain(self) -> None:
        try:
            while True:
                kind, res = self.ctl.results.get_nowait()
                self.results[f"{kind}-{res.get('worker', '')}"] = res
        except queue.Empty:
            pass

    def _crash(self) -> str:
        return "; ".join(str(r.get("crash", "")) + str(r.get("trace", "")) for r in self.results.values())  # type: ignore[union-attr]


def merge(workers: list[dict], pub: dict | None) -> dict:
    """Sum counters and merge histograms of all workers."""
    lat, ack, chat = Histogram(), Histogram(), Histogram()
    out: dict = {
        "delivered": 0, "delivered_all": 0, "chats_delivered": 0, "frames": 0, "frames_measured": 0, "lost": 0, "dup": 0,
        "gaps": 0, "acks": 0, "failed": 0, "retries": 0, "unavailable": False, "loadgen_cpu_s": 0.0,
        "errors": {}, "closes": {}, "chat_errors": {}, "failures": [], "first_joined_at": [], "rejoin_at": [],
    }
    for w in workers:
        for k in ("delivered", "delivered_all", "chats_delivered", "frames", "frames_measured", "lost", "dup", "gaps", "acks", "failed", "retries"):
            out[k] += w[k]
        out["unavailable"] = out["unavailable"] or w["unavailable"]
        out["loadgen_cpu_s"] += w["cpu_s"]
        for k in ("errors", "closes", "chat_errors"):
            for code, n in w[k].items():
                out[k][code] = out[k].get(code, 0) + n
        out["failures"].extend(w["failures"])
        out["first_joined_at"].extend(w["first_joined_at"])
        out["rejoin_at"].extend(w["rejoin_at"])
        lat.merge(w["latency"])
        ack.merge(w["ack_latency"])
        chat.merge(w["chat_latency"])
    out["latency"] = lat
    out["ack_latency"] = ack
    out["chat_latency"] = chat
    out["publisher"] = pub
    return out
