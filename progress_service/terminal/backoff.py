"""The reconnect policy of docs/protocol.md: exponential backoff with full jitter.

``delay = random(0, min(cap, base * 2**attempt))``; the attempt counter is
reset only once a connection has stayed up for ``stable_after`` seconds, so
a server that accepts and immediately drops connections cannot make clients
reconnect in a tight loop (a reconnect storm).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays between reconnect attempts of one client."""

    base: float = 0.5
    cap: float = 20.0
    stable_after: float = 10.0
    #: Consecutive failed or short-lived connections so far.
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)
    _connected_at: float | None = None

    def ceiling(self) -> float:
        """The upper bound of the next delay (before jitter)."""
        # min() before the power would overflow after ~1000 attempts.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 32))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts that attempt."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def long_delay(self) -> float:
        """For answers that say "back off hard" (rate limits, refused messages)."""
        self.attempt += 1
        return self.rng.uniform(self.cap / 2, self.cap)

    def connected(self, now: float | None = None) -> None:
        """A connection is up (authenticated); start its stability clock."""
        self._connected_at = time.monotonic() if now is None else now

    def disconnected(self, now: float | None = None) -> None:
        """The connection is gone: reset the counter only if it had been stable."""
        if self._connected_at is not None:
            now = time.monotonic() if now is None else now
            if now - self._connected_at >= self.stable_after:
                self.attempt = 0
        self._connected_at = None
