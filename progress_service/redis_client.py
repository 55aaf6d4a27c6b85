"""Redis clients for job data: one Redis, or a Redis Cluster (``PS_REDIS_CLUSTER``).

The gateway, the worker's publisher, tickets, revocations and cancel flags
all take their client from :func:`make_redis`. With ``cluster=True`` the URL
names any node of the cluster and the client is redis-py's
``RedisCluster`` with one addition: ``pipeline(transaction=True)`` works as
long as every key of the transaction hashes to one slot (a job's keys share
the tag ``{job:<id>}``), by running the MULTI on the node that owns the slot
(:class:`SlotTransaction`). redis-py's async cluster client refuses
transactions outright, and the code's MULTIs are all single-job.

The queue is not here: arq cannot shard, so it stays on a plain Redis
(``PS_QUEUE_REDIS_URL``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Slot of the single-Redis case (everything is one shard).
NO_SLOT = -1


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5)


def make_redis(url: str, *, cluster: bool = False) -> Redis:
    """A client that retries dropped connections instead of failing the request.

    ``cluster``: ``url`` names any node of a Redis Cluster; the result is a
    :class:`ClusterClient` (typed as ``Redis``: it has the same command API).
    """
    if cluster:
        client: Any = ClusterClient.from_url(
            url,
            socket_connect_timeout=5,
            socket_keepalive=True,
            retry=_retry(),
            retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        )
        return cast(Redis, client)
    plain: Redis = Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )
    return plain


def is_cluster(redis: object) -> bool:
    """True for a cluster client."""
    return isinstance(redis, RedisCluster)


def slot_of(redis: object, key: str) -> int:
    """The hash slot of ``key`` on a cluster client; :data:`NO_SLOT` on a single Redis."""
    if isinstance(redis, RedisCluster):
        return int(key_slot(key.encode()))
    return NO_SLOT


def _first_key(name: str, args: tuple[Any, ...]) -> Any:
    if name in ("evalsha", "eval"):
        return args[2] if len(args) > 2 and int(args[1]) > 0 else None
    if name == "execute_command":
        return args[1] if len(args) > 1 else None
    return args[0] if args else None


def set_queue(redis: Redis, queue: Redis) -> None:
    """Tell a cluster client which plain Redis holds the arq queue (:func:`queue_of`)."""
    if isinstance(redis, ClusterClient):
        redis.queue = queue


def queue_of(redis: Redis) -> Redis:
    """The client to enqueue with: the cluster client's queue Redis, else ``redis`` itself."""
    if isinstance(redis, ClusterClient):
        if redis.queue is None:
            raise RedisClusterException("no queue Redis set for this cluster client (PS_QUEUE_REDIS_URL)")
        return redis.queue
    return redis


class SlotTransaction:
    """``MULTI``/``EXEC`` of commands whose keys share one slot, run on the slot's master.

    Records the calls (the redis-py pipeline API: ``pipe.hget(...)`` etc.),
    then replays them in a real transaction pipeline of the owning node's
    client. A MOVED (resharding) or a dropped connection refreshes the slot
    map and runs the transaction once more.
    """

    def __init__(self, cluster: ClusterClient) -> None:
        self._cluster = cluster
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    async def __aenter__(self) -> SlotTransaction:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._calls.clear()

    def __len__(self) -> int:
        return len(self._calls)

    def __getattr__(self, name: str) -> Callable[..., SlotTransaction]:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> SlotTransaction:
            self._calls.append((name, args, kwargs))
            return self

        return record

    def _slot(self) -> int:
        slots = set()
        for name, args, _ in self._calls:
            key = _first_key(name, args)
            if key is not None:
                slots.add(key_slot(key if isinstance(key, bytes) else str(key).encode()))
        if len(slots) != 1:
            raise RedisClusterException(f"a transaction must name keys of exactly one slot (got {sorted(slots)})")
        return int(slots.pop())

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the recorded commands in one MULTI on the slot's master; their replies."""
        if not self._calls:
            return []
        slot = self._slot()
        for attempt in (1, 2):
            client = await self._cluster.client_for_slot(slot)
            try:
                async with client.pipeline(transaction=True) as pipe:
                    for name, args, kwargs in self._calls:
                        getattr(pipe, name)(*args, **kwargs)
                    return cast(list[Any], await pipe.execute(raise_on_error=raise_on_error))
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                moved = isinstance(exc, ResponseError) and str(exc).startswith(("MOVED", "ASK", "CLUSTERDOWN"))
                if attempt == 2 or not (moved or not isinstance(exc, ResponseError)):
                    raise
                await self._cluster.refresh_slots()
        raise AssertionError("unreachable")


class NodePipeline(SlotTransaction):
    """A non-transactional pipeline on a cluster: the calls grouped by master, one plain pipeline per master.

    Unlike redis-py's cluster pipeline it passes EVAL/EVALSHA (the presence
    and comment scripts) and keeps the replies in call order. The groups run
    at once; a master that fails fails only its own replies. Script objects
    called with ``client=`` this pipeline only record the EVALSHA: a NOSCRIPT
    reply is the caller's to handle (load the scripts and try again).
    """

    def __await__(self) -> Any:
        # ``Script.__call__`` awaits ``client.evalsha(...)``: recording is immediate.
        return self._recorded().__await__()

    async def _recorded(self) -> NodePipeline:
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the recorded calls, per master; their replies in call order."""
        if not self._calls:
            return []
        cluster = self._cluster
        await cluster.initialize()
        for attempt in (1, 2):
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            default = cluster.get_primaries()[0]
            for i, (name, args, _) in enumerate(self._calls):
                key = _first_key(name, args)
                node = default if key is None else cluster.nodes_manager.get_node_from_slot(
                    key_slot(key if isinstance(key, bytes) else str(key).encode())
                )
                groups.setdefault(node.name, (node, []))[1].append(i)
            results = await asyncio.gather(
                *(self._run(cluster.node_client(node), idx) for node, idx in groups.values()), return_exceptions=True
            )
            replies: list[Any] = [None] * len(self._calls)
            for (_node, idx), result in zip(groups.values(), results, strict=True):
                for n, i in enumerate(idx):
                    replies[i] = result if isinstance(result, BaseException) else result[n]
            moved = any(isinstance(r, ResponseError) and str(r).startswith(("MOVED", "ASK")) for r in replies)
            if moved and attempt == 1:
                await cluster.refresh_slots()
                continue
            break
        if raise_on_error:
            error = next((r for r in replies if isinstance(r, BaseException)), None)
            if error is not None:
                raise error
        return replies

    async def _run(self, client: Redis, idx: list[int]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for i in idx:
                name, args, kwargs = self._calls[i]
                getattr(pipe, name)(*args, **kwargs)
            return cast(list[Any], await pipe.execute(raise_on_error=False))


class ClusterClient(RedisCluster):  # type: ignore[misc]  # redis is untyped here (pyproject)
    """redis-py's cluster client plus single-slot transactions and one plain client per master."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node_clients: dict[str, Redis] = {}
        #: The plain Redis of the arq queue (arq cannot shard): set by the app and the worker.
        self.queue: Redis | None = None

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """``transaction=True``: a :class:`SlotTransaction`; else a :class:`NodePipeline`."""
        if transaction:
            return SlotTransaction(self)
        return NodePipeline(self)

    async def refresh_slots(self) -> None:
        """Ask the cluster for its slot map again (after MOVED or a lost node)."""
        await self.nodes_manager.initialize()

    async def client_for_slot(self, slot: int) -> Redis:
        """A plain client of the master that owns ``slot``."""
        await self.initialize()
        node = self.nodes_manager.get_node_from_slot(slot)
        return self.node_client(node)

    def node_client(self, node: ClusterNode) -> Redis:
        """A plain (non-cluster) client of one node, made once per node."""
        client = self._node_clients.get(node.name)
        if client is None:
            client = self._node_clients[node.name] = Redis(
                host=node.host,
                port=int(node.port),
                socket_connect_timeout=5,
                socket_keepalive=True,
                retry=_retry(),
                retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
            )
        return client

    async def master_of(self, key: str) -> ClusterNode:
        """The master holding ``key``'s slot."""
        await self.initialize()
        return self.nodes_manager.get_node_from_slot(key_slot(key.encode()))

    async def aclose(self) -> None:
        """Close the cluster client and the per-node clients."""
        for client in self._node_clients.values():
            await client.aclose()
        self._node_clients.clear()
        await super().aclose()
