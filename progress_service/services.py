"""The long-lived resources one app process shares: settings, Redis, store, queue.

Created once in the app's lifespan and handed to handlers through Litestar
dependency injection (``services``), so nothing reaches for globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.settings import Settings

if TYPE_CHECKING:
    from progress_service.gateway import Gateway


@dataclass
class Services:
    settings: Settings
    redis_url: str
    #: General-purpose client (commands, MULTI); bytes in, bytes out.
    redis: Redis
    engine: AsyncEngine
    arq: ArqRedis
    #: True when jobs run on the replay program rather than Claude Code.
    demo: bool = False
    gateway: Gateway | None = None
    extras: dict[str, Any] = field(default_factory=dict)
