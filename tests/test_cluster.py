"""Redis Cluster: a real 3-master cluster, two ``serve`` nodes and two workers.

The cluster holds job data (events, snapshots, presence, tickets,
revocations, cancel flags); the arq queue stays on the shared single Redis
(``PS_QUEUE_REDIS_URL``: arq cannot shard). Shows that jobs run and stream,
watchers on both nodes get every event once and in order, comments,
presence, tickets and revocation cross nodes, and that a failed shard leaves
rooms on the other shards untouched and its own rooms resume once it is back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from cluster_helpers import Cluster, redis_cluster, redis_server_available
from conftest import missing_service
from gateway_helpers import Store, publish, serve
from progress_service.redis_client import make_redis
from test_comments_e2e import clients

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not redis_server_available():
        missing_service("redis-server/redis-cli not installed: cannot start a Redis Cluster")
    with redis_cluster(tmp_path / "cluster") as c:
        yield c


def _cluster_settings(make_settings: Any, cluster: Cluster, queue_url: str, **extra: Any) -> Any:
    return make_settings(redis_url=cluster.url, redis_cluster=True, queue_redis_url=queue_url, **extra)


async def test_cluster_jobs_comments_presence_tickets_revocation_across_nodes(
    cluster: Cluster, postgres_url: str, make_settings: Any, server_process: Any, redis_url: str
) -> None:
    settings = _cluster_settings(make_settings, cluster, redis_url, database_url=postgres_url, replay_speed=20.0)
    n1, n2 = server_process(settings, "serve"), server_process(settings, "serve")
    server_process(settings, "worker")
    server_process(settings, "worker")
    async with Store(postgres_url) as store:
        admin = await store.token(role="admin", user="boss")
        alice = await store.token(role="reviewer", user="alice")
        bob_token, bob_id = await store.token_with_id(role="reviewer", user="bob")
        auth = {"Authorization": f"Bearer {admin}"}
        async with httpx.AsyncClient(base_url=n1.url, headers=auth, timeout=10) as http:
            jobs = []
            for i in range(4):
                res = await http.post("/api/jobs", json={"prompt": f"cluster job {i}"})
                assert res.status_code in (200, 201), res.text
                jobs.append(res.json()["id"])
        rooms = [f"job:{j}" for j in jobs]
        async with clients([n1.url, n2.url], ["alice@1", "bob@2"]) as (a, b):
            await a.auth_join(alice)
            await b.auth_join(bob_token)
            for room in rooms:
                await a.send(type="join", roomId=room)
                await b.send(type="join", roomId=room)
            for room in rooms:
                await a.wait_for(lambda m, r=room: m.get("type") == "joined" and m["roomId"] == r)
                await b.wait_for(lambda m, r=room: m.get("type") == "joined" and m["roomId"] == r)

            # Presence across nodes: bob (node 2) is in alice's (node 1) rooms.
            await a.wait_for(
                lambda m: m.get("type") == "presence" and any(p["userName"] == "bob" for p in m.get("joined", []))
                or (m.get("type") == "joined" and any(p["userName"] == "bob" for p in m.get("presence", [])))
            )

            # Every job runs to its end; both nodes see every item once, in order.
            def ended(room: str) -> Any:
                return lambda m: (
                    m.get("type") == "event" and m["roomId"] == room and m.get("kind") == "status"
                    and m["data"].get("status") in ("succeeded", "failed", "cancelled")
                )

            for room in rooms:
                await a.wait_for(ended(room), timeout=100)
                await b.wait_for(ended(room), timeout=30)

            # A comment on node 1 reaches node 2 (once, in the room's order).
            ack = await a.chat(rooms[0], "r-1", "hello from node 1")
            assert ack["type"] == "ack", ack
            await b.wait_for(lambda m: m.get("type") == "chat" and m.get("requestId") == "r-1")
            data = make_redis(cluster.url, cluster=True)
            try:
                for room, job in zip(rooms, jobs, strict=True):
                    stored = [e[0].decode() for e in await data.xrange(f"ps:{{job:{job}}}:events")]
                    for c in (a, b):
                        ids = [i for _k, i in c.items(room)]
                        assert ids == stored, (c.name, room)
                        assert len(ids) == len(set(ids))
            finally:
                await data.aclose()
            assert len(b.chats("r-1")) == 1

            # A ticket issued by node 1 authenticates on node 2, once.
            async with httpx.AsyncClient(base_url=n1.url, headers={"Authorization": f"Bearer {alice}"}) as http:
                res = await http.post("/api/ws-tickets")
                assert res.status_code in (200, 201), res.text
                ticket = res.json()["ticket"]
            async with clients([n2.url], ["ticket@2"]) as (t,):  # connected now: an idle socket is closed 4401
                await t.auth_join(ticket, rooms[1])

            # Revoking bob's token on node 1 closes his connection on node 2.
            async with httpx.AsyncClient(base_url=n1.url, headers=auth) as http:
                res = await http.delete(f"/api/tokens/{bob_id}")
                assert res.status_code == 200, res.text
            assert await b.wait_closed(10) == (4403, "token revoked")


def _job_on(cluster_client: Any, port: int, *, other_than: int | None = None) -> str:
    """A fresh job id whose slot is served by the master on ``port`` (or by any master but ``other_than``)."""
    from redis.crc import key_slot  # noqa: PLC0415

    nm = cluster_client.nodes_manager
    while True:
        job = uuid.uuid4().hex[:12]
        node = nm.get_node_from_slot(key_slot(f"ps:{{job:{job}}}:events".encode()))
        if (other_than is None and node.port == port) or (other_than is not None and node.port != other_than):
            return job


async def test_failed_shard_leaves_other_shards_rooms_untouched(
    cluster: Cluster, store_url: str, make_settings: Any, redis_url: str
) -> None:
    settings = _cluster_settings(make_settings, cluster, redis_url, database_url=store_url)
    pub = make_redis(cluster.url, cluster=True)
    try:
        await pub.initialize()
        victim = cluster.ports[1]
        async with Store(store_url) as store, serve(settings) as (base, app):
            token = await store.token()
            doomed, safe = await store.job(), await store.job()
            # Ids are random: pick rooms by where their slots live.
            while True:
                nodes = {j: pub.nodes_manager.get_node_from_slot(pub.keyslot(f"ps:{{job:{j}}}:events")).port for j in (doomed, safe)}
                if nodes[doomed] == victim and nodes[safe] != victim:
                    break
                if nodes[doomed] != victim:
                    doomed = await store.job()
                if nodes[safe] == victim:
                    safe = await store.job()
            before = await publish(pub, doomed, 5)
            async with clients([base], ["w"]) as (w,):
                await w.auth_join(token, f"job:{doomed}")
                await w.send(type="join", roomId=f"job:{safe}")
                await w.wait_for(lambda m: m.get("type") == "joined" and m["roomId"] == f"job:{safe}")
                await w.wait_for(lambda m: m.get("type") == "event" and m.get("id") == before[-1])
                # Presence's periodic work runs its scripts through the cluster's per-master pipelines.
                presence = app.state.services.gateway.presence
                await presence._heartbeat()
                await presence._readd_all()
                await presence._sweep_rooms({doomed, safe})

                cluster.kill_node(victim)
                # The other shards' room: every event, promptly, while the shard is down.
                live = await publish(pub, safe, 20)
                await w.wait_for(lambda m: m.get("type") == "event" and m.get("id") == live[-1], timeout=5)
                assert [i for _k, i in w.items(f"job:{safe}")] == live

                cluster.start_node(victim)  # same config file: same slots, empty data (no persistence)
                cluster.wait_ok()
                with anyio.fail_after(20):
                    while True:
                        try:
                            after = await publish(pub, doomed, 5, start=5)
                            break
                        except Exception:  # noqa: BLE001 - the client reconnects to the restarted node
                            await anyio.sleep(0.2)
                await w.wait_for(lambda m: m.get("type") == "event" and m.get("id") == after[-1], timeout=20)
                assert [i for _k, i in w.items(f"job:{doomed}")] == before + after
                assert app.state.services.gateway.hub.reconnects > 0
                more = await publish(pub, safe, 3, start=20)
                await w.wait_for(lambda m: m.get("type") == "event" and m.get("id") == more[-1], timeout=5)
                assert [i for _k, i in w.items(f"job:{safe}")] == live + more
    finally:
        await pub.aclose()


async def test_cluster_client_runs_single_slot_transactions_and_refuses_cross_slot_ones(cluster: Cluster) -> None:
    """MULTI of one job's keys runs on its slot's master; two jobs' keys in one MULTI fail before anything is sent."""
    from redis.exceptions import RedisClusterException  # noqa: PLC0415

    client = make_redis(cluster.url, cluster=True)
    try:
        job = uuid.uuid4().hex[:12]
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(f"ps:{{job:{job}}}:snap", "s", b"x")
            pipe.hincrby(f"ps:{{job:{job}}}:snap", "n", 2)
            pipe.hget(f"ps:{{job:{job}}}:snap", "s")
            assert await pipe.execute() == [1, 2, b"x"]
        others = [uuid.uuid4().hex[:12] for _ in range(40)]
        with pytest.raises(RedisClusterException, match="one slot"):
            async with client.pipeline(transaction=True) as pipe:
                for other in others[:2]:
                    pipe.set(f"ps:{{job:{other}}}:x", b"1")
                await pipe.execute()
        assert await client.exists(*(f"ps:{{job:{o}}}:x" for o in others[:2])) == 0
        # A plain pipeline over many slots (and scripts): per master, replies in call order.
        async with client.pipeline() as pipe:
            for i, other in enumerate(others):
                pipe.set(f"ps:{{job:{other}}}:x", str(i).encode())
                pipe.eval("return redis.call('GET', KEYS[1])", 1, f"ps:{{job:{other}}}:x")
            replies = await pipe.execute()
        assert replies == [r for i in range(len(others)) for r in (True, str(i).encode())]
        masters = {client.nodes_manager.get_node_from_slot(client.keyslot(f"ps:{{job:{o}}}:x")).name for o in others}
        assert len(masters) == 3  # the pipeline really spanned every master
    finally:
        await client.aclose()
