"""Shared-memory control block between the orchestrator, load generators and the publisher.

Plain lock-free ``multiprocessing`` arrays: each slot has one writer, readers
poll. That keeps the closed loop (publisher reads subscriber progress) free
of pipes and pickling on the hot path.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import SpawnContext

#: Phases every process follows (``Control.phase``).
CONNECT, WARMUP, MEASURE, STOP = 0, 1, 2, 3


class Control:
    """Phase flag, per-worker counters and per-room seq targets (all shared memory)."""

    def __init__(self, ctx: SpawnContext, workers: int, rooms: int) -> None:
        self.phase = ctx.Value("i", CONNECT, lock=False)
        #: Clients start connecting when set (so process start-up is not timed).
        self.go = ctx.Value("i", 0, lock=False)
        #: Worker i has started its loop and waits for ``go``.
        self.ready = ctx.Array("q", workers, lock=False)
        #: Publisher stops when set (open-loop scenarios end publishing before measuring ends).
        self.pub_stop = ctx.Value("i", 0, lock=False)
        #: The publisher has imported, set up its path and reached Redis: it publishes from WARMUP on.
        self.pub_ready = ctx.Value("i", 0, lock=False)
        #: Clients of worker i that are authenticated and joined to all their rooms.
        self.joined = ctx.Array("q", workers, lock=False)
        #: Clients of worker i that came back (joined again) after losing their connection.
        self.rejoined = ctx.Array("q", workers, lock=False)
        #: Min over worker i's clients of the last seq seen in room 0 (closed-loop feedback).
        self.progress = ctx.Array("q", workers, lock=False)
        #: Clients of worker i that have seen every room's ``target`` seq.
        self.caught_up = ctx.Array("q", workers, lock=False)
        #: Per room: the last seq published (set by the publisher when it stops; 0 = unknown).
        self.target = ctx.Array("q", max(rooms, 1), lock=False)
        #: Clients of worker i that failed for good (refused, closed without reconnect).
        self.failed = ctx.Array("q", workers, lock=False)
        self.results: mp.Queue = ctx.Queue()


def spawn_context() -> SpawnContext:
    """A ``spawn`` context: load generators start clean (no copy of the parent's loop)."""
    return mp.get_context("spawn")
