"""This node's readiness: dependency checks probed in the background, and the draining flag.

``/readyz`` is what a load balancer asks every second, so it must answer in
milliseconds even when the process is busy fanning out events, and tell the
truth. :class:`Readiness` (``Services.readiness``, built by
:func:`~progress_service.services.build_services`, its probe task run by
:meth:`Services.run <progress_service.services.Services.run>`) checks Redis
— each primary when it is a cluster —, the queue's Redis when it is another
one, and the SQL store, every ``PS_READY_PROBE_INTERVAL`` seconds, each
check bounded by a timeout; a request only reads the last result
(:meth:`Readiness.answer`), so it never queues behind a connection pool or
the store gate. ``api.health.HealthFront`` serves it before the app.

It turns 503 as soon as the node starts draining (``Server.shutdown``, then
``Services.drain``), and when the probe itself has not finished for a while
(a stuck loop is not a ready node). The body names what is down:
``{"status": "unavailable", "checks": {"redis": "ok", "store": "error:
ConnectionRefusedError"}, "status_code": 503, "detail": "not ready: store
error: ConnectionRefusedError"}``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import sqlalchemy as sa
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from sqlalchemy.ext.asyncio import AsyncEngine

from progress_service.redis_client import ClusterClient

#: Seconds one dependency check may take before it counts as down.
CHECK_TIMEOUT = 2.0


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of ``/healthz`` and ``/readyz``."""

    status: str
    checks: dict[str, str] = {}
    #: When unavailable: the API's error body fields too (``ErrorBody``).
    status_code: int | None = None
    detail: str | None = None


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}" if not isinstance(exc, TimeoutError) else "error: timeout"


class Readiness:
    """The node's readiness (see the module docstring); run :meth:`run` in the app's task group.

    ``redis`` is the general client (a cluster client is checked per
    primary), ``queue`` the queue's client when it is another Redis (else
    None), ``engine`` the store.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        engine: AsyncEngine,
        *,
        queue: Redis | None = None,
        interval: float = 1.0,
        timeout: float = CHECK_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.queue = queue
        self.engine = engine
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self.checks: dict[str, str] = {}
        #: Monotonic time the last probe finished (None: none yet).
        self.checked_at: float | None = None
        self.draining = False

    def drain(self) -> None:
        """From now on answer 503 ``draining`` (the node is shutting down)."""
        self.draining = True

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probe once, report started (the node answers the truth from its first request on), then every ``interval`` s."""
        await self.probe()
        task_status.started()
        while True:
            await anyio.sleep(self.interval)  # the probe's period, not a synchronisation
            await self.probe()

    async def probe(self) -> None:
        """Run every check at once (each bounded by ``timeout``) and keep the results."""
        checks: dict[str, str] = {}

        async def check(name: str, call: Callable[[], Awaitable[object]]) -> None:
            try:
                with anyio.fail_after(self.timeout):
                    await call()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
                checks[name] = _error(exc)

        primaries: list[ClusterNode] = []
        if isinstance(self.redis, RedisCluster):
            # The slot map first (a fresh client has none, and no primaries to name).
            await check("redis", self.redis.initialize)
            if checks.pop("redis") == "ok":
                primaries = self.redis.get_primaries()
            else:
                checks["redis"] = "error: no cluster slot map"
        async with anyio.create_task_group() as tg:
            if isinstance(self.redis, RedisCluster):
                for node in primaries:
                    tg.start_soon(check, f"redis {node.host}:{node.port}", _ping_node(self.redis, node))
            else:
                tg.start_soon(check, "redis", self.redis.ping)
            if self.queue is not None:
                tg.start_soon(check, "queue", self.queue.ping)
            tg.start_soon(check, "store", self._select_one)
        self.checks = dict(sorted(checks.items()))
        self.checked_at = self._clock()

    async def _select_one(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def answer(self) -> tuple[int, Health]:
        """The status code and body ``/readyz`` answers now (no I/O)."""
        checks = dict(self.checks)
        if self.draining:
            checks["node"] = "draining"
        elif self.checked_at is None:
            checks["node"] = "starting"
        elif self._clock() - self.checked_at > 2 * self.interval + self.timeout + 1:
            checks["node"] = "probe stalled"
        if all(v == "ok" for v in checks.values()):
            return 200, Health(status="ok", checks=checks)
        down = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
        return 503, Health(status="unavailable", checks=checks, status_code=503, detail=f"not ready: {down}")


def _ping_node(cluster: RedisCluster, node: ClusterNode) -> Callable[[], Awaitable[object]]:
    # The node's own client (the broker's per-master client from
    # redis_client.ClusterClient), not the cluster client's routing: its
    # retries and topology refresh on one dead node would fail the others' pings.
    async def ping() -> object:
        if isinstance(cluster, ClusterClient):
            return await cluster.node_client(node).ping()
        return await node.execute_command("PING")

    return ping
