"""Replay pages read a moment ago, for the joins of the same room that come a little later (:class:`RecentPages`).

The hub's single flight shares a page only among joins whose reads
overlap. A storm into many rooms (clients reconnecting after a deploy, a
team opening one link) brings each room's joins over a second or two, and
each read its own page: in a 2,000-join storm over 100 rooms the page reads
were a fifth of the server's CPU. A page read a moment ago is as good an
answer as a read that began a moment ago, which the single flight already
hands out: entries never change and ids only grow, and a replay goes on
reading from the page's last id until it reaches the hub's cursor, so
nothing after the page is missed. Pages are kept encoded (an entry's wire
text is the same for every member), for ``ttl`` seconds and up to
``max_entries`` entries in all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

#: A room's log position a replay reads after: (job id, entry id or None for the start).
PageKey = tuple[str, str | None]


class Page(NamedTuple):
    """One replay page: ``(id, wire text, size)`` per entry, and whether the read was a whole one (more may follow)."""

    entries: list[tuple[str, str, int]]
    full: bool


class RecentPages:
    """Pages by :data:`PageKey`, each for ``ttl`` seconds, at most ``max_entries`` entries in all (oldest dropped first)."""

    __slots__ = ("_clock", "_entries", "_pages", "max_entries", "ttl")

    def __init__(self, ttl: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        #: key -> (monotonic expiry, page), oldest first.
        self._pages: dict[PageKey, tuple[float, Page]] = {}
        self._entries = 0

    def __len__(self) -> int:
        """Pages kept now (expired ones included until they are dropped)."""
        return len(self._pages)

    def get(self, key: PageKey) -> Page | None:
        """The page read at ``key`` less than ``ttl`` seconds ago, or None."""
        found = self._pages.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(key)
            return None
        return found[1]

    def put(self, key: PageKey, page: Page) -> None:
        """Keep ``page`` for ``ttl`` seconds (a newer read of ``key`` replaces the older)."""
        size = len(page.entries)
        if size > self.max_entries:
            return
        if key in self._pages:
            self._drop(key)
        now = self._clock()
        # The oldest go first (insertion order is expiry order): the expired, then what does not fit.
        while self._pages:
            oldest = next(iter(self._pages))
            if self._pages[oldest][0] > now and self._entries + size <= self.max_entries:
                break
            self._drop(oldest)
        self._pages[key] = (now + self.ttl, page)
        self._entries += size

    def _drop(self, key: PageKey) -> None:
        _, page = self._pages.pop(key)
        self._entries -= len(page.entries)
