"""Per-connection limits: a token bucket for chat, sliding-window budgets, JSON depth.

All are plain computations on the connection's own receive path, so they
need no locks and no tasks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from collections import deque


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the request is refused)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowBudget:
    """At most ``limit`` hits within any ``window`` seconds.

    Used for the error budget (refused requests per minute) and for
    "persistent" chat abuse (refusals for rate limiting within a few seconds).
    """

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: deque[float] = deque()

    def hit(self) -> bool:
        """Record one hit; False once the budget is exhausted."""
        now = self._clock()
        cutoff = now - self.window
        while self._hits and self._hits[0] <= cutoff:
            self._hits.popleft()
        self._hits.append(now)
        return len(self._hits) <= self.limit


#: A JSON string (possibly unterminated) or one bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def json_too_deep(text: str, limit: int) -> bool:
    """True when ``text`` nests arrays/objects deeper than ``limit`` (checked before decoding).

    msgspec recurses once per level (also to skip an unknown field's value
    while it looks for the tag), so a 2 KB frame of brackets reaches
    Python's recursion limit inside the server. Brackets inside strings do
    not count. Almost every frame has fewer brackets than the limit in all,
    which two ``str.count`` calls settle without a scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        char = match.group()[0]
        if char == '"':
            continue
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
