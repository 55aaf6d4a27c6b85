"""Measurements: a mergeable latency histogram, process CPU/RSS, machine and versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

#: Histogram resolution: 0.1 ms buckets up to 10 s, then 10 ms buckets up to ~1000 s; anything
#: slower lands in the last bucket (the exact maximum is tracked separately).
BUCKET_NS = 100_000
FINE = 100_000
COARSE_NS = 10_000_000
BUCKETS = FINE + 100_000


class Histogram:
    """Latency counts in fixed 0.1 ms buckets: O(1) to record, trivial to merge across processes."""

    __slots__ = ("counts", "max_ns", "n")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.n = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        """Count one latency in nanoseconds (negative clock skew counts as 0)."""
        # No max()/min() calls: this runs once per delivery in the load
        # generator, whose core is what limits a fan-out run's rate.
        if ns < 0:
            ns = 0
        i = ns // BUCKET_NS
        if i >= FINE:
            i = FINE + (ns - FINE * BUCKET_NS) // COARSE_NS
            if i >= BUCKETS:
                i = BUCKETS - 1
        self.counts[i] += 1
        self.n += 1
        if ns > self.max_ns:
            self.max_ns = ns

    def merge(self, other: dict) -> None:
        """Add a histogram exported with :meth:`export` (from another process)."""
        for i, c in other["sparse"]:
            self.counts[i] += c
        self.n += other["n"]
        self.max_ns = max(self.max_ns, other["max_ns"])

    def export(self) -> dict:
        """A picklable, sparse form for sending to the parent process."""
        return {"sparse": [(i, c) for i, c in enumerate(self.counts) if c], "n": self.n, "max_ns": self.max_ns}

    def percentile_ms(self, p: float) -> float | None:
        """The upper edge of the bucket holding the p-th percentile, in ms."""
        if self.n == 0:
            return None
        target = max(1, round(self.n * p / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target:
                edge = (i + 1) * BUCKET_NS if i < FINE else FINE * BUCKET_NS + (i - FINE + 1) * COARSE_NS
                return round(min(edge, self.max_ns) / 1e6, 2)
        return round(self.max_ns / 1e6, 2)

    def summary(self) -> dict:
        """p50/p99/max in ms."""
        return {
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "max_ms": round(self.max_ns / 1e6, 2) if self.n else None,
            "samples": self.n,
        }


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # The command name may contain spaces; fields after ") " are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    """nproc, CPU model, memory and load: the context every figure needs."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "kernel": platform.release(),
    }


def versions(redis_server: str | None = None) -> dict:
    """Versions of the runtime pieces that decide the figures."""
    out = {"python": platform.python_version()}
    for dist in ("litestar", "uvicorn", "websockets", "wsproto", "msgspec", "redis", "uvloop", "httptools"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if redis_server:
        try:
            line = subprocess.run([redis_server, "--version"], capture_output=True, text=True, timeout=5, check=False).stdout
            out["redis_server"] = line.split("v=", 1)[1].split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["redis_server"] = None
    return out
