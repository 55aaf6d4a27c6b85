"""Process setup shared by every bench process: open-file limit and event loop."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def raise_nofile() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (thousands of sockets). Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when installed (as the server does), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
