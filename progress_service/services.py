"""The long-lived resources one app process shares: settings, Redis, store, queue.

Created once in the app's lifespan and handed to handlers through Litestar
dependency injection (``services``), so nothing reaches for globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.settings import Settings



@dataclass
class Services:
    settings: Settings
    redis_url: str
    #: General-purpose client (commands, MULTI); bytes in, bytes out.
    redis: Redis
    engine: AsyncEngine
    arq: ArqRedis
    # Typed loosely on purpose: Litestar/msgspec evaluate this dataclass's
    # annotations at runtime (DI of `services`), where the TYPE_CHECKING-only
    # name `Gateway` does not exist. It holds a progress_service.gateway.Gateway.
    gateway: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
