"""The composition root's two containers: the connections, and the components built on them.

:func:`build_services` is the one place the process's components are made;
each gets its dependencies through its constructor. The app's lifespan
(:func:`progress_service.app.create_app`) opens the :class:`Resources`,
builds the :class:`Services`, runs their long-lived tasks in its task group
(:meth:`Services.run`) and ends them through one shutdown path
(:meth:`Services.drain`, then cancelling that task group). Handlers receive
the parts they use through Litestar's dependency injection
(``progress_service.api.deps``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service import history
from progress_service.auth import PrincipalCache
from progress_service.comments import Comments
from progress_service.gateway import Gateway, new_node_id
from progress_service.gateway.limits import ConnectionCap
from progress_service.gateway.chat import CommentsHook
from progress_service.hooks.gate import HookGate
from progress_service.hooks.ingest import Ingest
from progress_service.http_limits import HttpLimiter
from progress_service.jobs import Jobs
from progress_service.readiness import Readiness
from progress_service.revocation import RevocationWatcher
from progress_service.settings import Settings
from progress_service.steering import Steering
from progress_service.store.audit import Audit
from worker.recovery import Sweeper


@dataclass(frozen=True, slots=True)
class Resources:
    """The connections one app process holds: opened and closed by the lifespan."""

    settings: Settings
    redis_url: str
    #: General-purpose client (commands, MULTI); bytes in, bytes out.
    redis: Redis
    engine: AsyncEngine
    #: The job queue's pool: on ``PS_QUEUE_REDIS_URL`` when that is set, else on ``redis_url``.
    arq: ArqRedis

    @property
    def queue_is_separate(self) -> bool:
        """True when the queue has a Redis of its own (job data stay on ``redis_url``)."""
        return self.settings.queue_url(self.redis_url) != self.redis_url


#: Makes the gateway's chat hook from the connections; None: chat answers ``unavailable``.
#: A seam for tests (the default is the process's :class:`Comments`).
ChatHookFactory = Callable[[Resources], CommentsHook | None]


@dataclass(frozen=True, slots=True)
class Services(Resources):
    """Every long-lived component of the process, built once by :func:`build_services`."""

    #: The non-blocking audit writer (its task checkpoints and flushes on the way out).
    audit: Audit
    #: Durable comments (group-commit writer task).
    comments: Comments
    #: Instructions and permission answers for running jobs.
    steering: Steering
    #: ``/ws`` sessions, hub, presence, SSE streams.
    gateway: Gateway
    #: Closes live connections of revoked tokens.
    revocations: RevocationWatcher
    #: Claude Code hooks: the route's checks and queue (``hooks.ingest`` is its task).
    hooks: HookGate
    #: Submitting and cancelling jobs.
    jobs: Jobs
    #: ``/readyz``: the background dependency probe and the draining flag.
    readiness: Readiness
    #: The per-user WebSocket cap over all nodes (the gateway admits through it).
    connections: ConnectionCap
    #: The HTTP rate limit over all nodes (``RedisRateLimitMiddleware`` counts with it).
    http_limit: HttpLimiter

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every component task until cancelled (the lifespan's task group cancels it)."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.comments.run)  # before the first request can post
            await tg.start(self.readiness.run)  # one probe first: /readyz is truthful from the first request
            tg.start_soon(self.gateway.run)
            # Refreshes this node's entries of the connection cap and sends
            # releases; on cancel, releases what this node still counts.
            tg.start_soon(self.connections.run)
            tg.start_soon(self.audit.run)
            tg.start_soon(self.revocations.run)
            tg.start_soon(self.hooks.ingest.run)
            # PS_HISTORY_DAYS: prunes the event archive.
            tg.start_soon(history.run_retention, self.engine, self.settings)
            # Lost-worker recovery runs here too, so a job whose worker
            # vanished is retried or failed even when no worker is alive.
            tg.start_soon(_run_sweeper, self)
            task_status.started()

    async def drain(self) -> None:
        """The shutdown path, before the tasks are cancelled: close connections, apply accepted hooks, stop the comment writer.

        :class:`~progress_service.server.Server` closes the connections
        earlier (before HTTP requests finish); :meth:`Gateway.close_all` runs
        once, so here it then only waits for that. ``/readyz`` answers 503
        from the first line on (the server drains it earlier still).
        """
        self.readiness.drain()
        await self.gateway.close_all()
        await self.hooks.ingest.aclose()  # what the CLI was told is accepted gets applied
        await self.comments.aclose()


def build_services(resources: Resources, *, chat_hook: ChatHookFactory | None = None) -> Services:
    """Assemble the process's components on ``resources`` (the composition root)."""
    settings, redis, engine = resources.settings, resources.redis, resources.engine
    audit = Audit.from_settings(engine, settings)
    comments = Comments(engine, redis, settings)
    steering = Steering(engine, redis, settings)
    principals = PrincipalCache()
    connections = ConnectionCap(redis, new_node_id(), settings.ws_max_connections_per_user, settings.ws_connection_ttl)
    gateway = Gateway(
        resources,
        comments=comments if chat_hook is None else chat_hook(resources),
        steering=steering,
        audit=audit,
        principals=principals,
        connections=connections,
    )
    ingest = Ingest(engine, redis, settings, audit=audit)
    return Services(
        settings=settings,
        redis_url=resources.redis_url,
        redis=redis,
        engine=engine,
        arq=resources.arq,
        audit=audit,
        comments=comments,
        steering=steering,
        gateway=gateway,
        revocations=RevocationWatcher(engine, redis, gateway),
        hooks=HookGate(engine, redis, settings, ingest, principals),
        jobs=Jobs(engine, redis, resources.arq, settings, audit),
        # The queue is checked on its own when it is another Redis.
        readiness=Readiness(
            redis,
            engine,
            queue=resources.arq if resources.queue_is_separate else None,
            interval=settings.ready_probe_interval,
        ),
        connections=connections,
        http_limit=HttpLimiter(settings, principals),
    )


async def _run_sweeper(services: Services) -> None:
    """The lost-worker sweeper (:class:`worker.recovery.Sweeper`) for the app's lifetime."""
    if services.queue_is_separate:
        # Leases and run state are on the data Redis (the cluster, with
        # PS_REDIS_CLUSTER); re-enqueues go to the queue's.
        await Sweeper(services.redis, services.engine, services.settings, queue=services.arq).run()
        return
    await Sweeper(services.arq, services.engine, services.settings).run()
