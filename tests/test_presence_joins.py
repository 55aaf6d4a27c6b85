"""Presence on join costs what changed, not the room's size (real Redis, the join script itself)."""

from __future__ import annotations

import uuid
from typing import Any

import anyio

from progress_service.gateway.presence import DELTA_MAX, Presence
from progress_service.store.identity import Principal


def _user(i: int) -> Principal:
    return Principal(user_id=f"u{i}", user_name=f"User {i}", team_id="t", team_name="t", role="viewer", token_id=f"k{i}")


async def _join_batch(presence: Presence, redis: Any, job: str, users: list[Principal]) -> list[tuple[str, Any, list]]:
    """One MULTI of joins, as JoinReads builds it; (entry, raw reply, members) per join."""
    presence.start_batch()
    async with redis.pipeline(transaction=True) as pipe:
        entries = [presence.queue_join(pipe, job, uuid.uuid4().hex[:8], p) for p in users]
        replies = await pipe.execute()
    out = []
    for p, entry, reply in zip(users, entries, replies, strict=True):
        observed = presence.observe(job, p, reply)
        assert observed is not None
        presence.joined(job, entry, p)
        out.append((entry, reply, observed[1]))
    return out


async def test_joins_into_a_big_room_read_the_changes_not_the_members(redis) -> None:
    job = uuid.uuid4().hex[:12]
    node = Presence(redis, f"node-{job}", grace=1.0)
    await node.load_scripts()
    crowd = [_user(i % 40) for i in range(400)]  # 400 connections of 40 users
    results = await _join_batch(node, redis, job, crowd)
    assert {m.userId for m in results[-1][2]} == {f"u{i}" for i in range(40)}
    # The first join of the room asked for the whole set (the node had no view), the others for nothing.
    assert results[0][1][2] == b"f"
    assert all(reply[2] == b"n" for _, reply, _ in results[1:])

    # Another node's joins: two new users. This node's next joins read those two log entries, not 400 entries.
    other = Presence(redis, f"other-{job}", grace=1.0)
    await _join_batch(other, redis, job, [_user(100), _user(101)])
    again = await _join_batch(node, redis, job, [_user(1), _user(102)])
    mode, data = again[0][1][2], again[0][1][3]
    assert mode == b"d" and len(data) == 2
    assert {m.userId for m in again[-1][2]} == {f"u{i}" for i in (*range(40), 100, 101, 102)}


async def test_a_view_too_far_behind_reads_the_whole_set(redis) -> None:
    job = uuid.uuid4().hex[:12]
    node = Presence(redis, f"node-{job}", grace=1.0)
    await node.load_scripts()
    await _join_batch(node, redis, job, [_user(0)])
    other = Presence(redis, f"other-{job}", grace=1.0)
    await _join_batch(other, redis, job, [_user(i) for i in range(1, DELTA_MAX + 5)])
    (_, reply, members), = await _join_batch(node, redis, job, [_user(0)])
    assert reply[2] == b"f"
    assert len(members) == DELTA_MAX + 5  # u0 .. u68


def _log(entries: list[Any]) -> list[tuple[str, str]]:
    import json  # noqa: PLC0415

    out = []
    for _eid, fields in entries:
        for k in (b"j", b"l"):
            if k in fields:
                out.append((k.decode(), json.loads(fields[k])["userId"]))
    return out


async def test_a_dead_nodes_users_are_announced_left_and_a_forgotten_node_writes_itself_back(redis) -> None:
    """Upkeep costs what changed: one heartbeat per node; a node whose heartbeat lapsed is cleared by another.

    The lex index answers "is this user here?" (no member scan); the clearing and the write-back agree with it.
    """
    from progress_service.gateway.presence import LIVE  # noqa: PLC0415
    from progress_service.keys import (  # noqa: PLC0415
        presence_index_key,
        presence_key,
        presence_node_rooms_key,
        presence_nodes_key,
        presence_stream_key,
    )

    job = uuid.uuid4().hex[:12]
    a, b = Presence(redis, f"a-{job}", grace=0.2), Presence(redis, f"b-{job}", grace=0.2)
    await a.load_scripts()
    await _join_batch(a, redis, job, [_user(1), _user(2)])
    await _join_batch(b, redis, job, [_user(1)])  # u1 again, from another node: not announced again
    for node in (a, b):
        await node._list_new_rooms()
        await node._heartbeat()
    assert _log(await redis.xrange(presence_stream_key(job))) == [("j", "u1"), ("j", "u2")]
    assert await redis.smembers(presence_node_rooms_key(a.node_id)) == {job.encode()}
    # Live entries do not expire on their own: nothing refreshes them.
    assert {score for _, score in await redis.zrange(presence_key(job), 0, -1, withscores=True)} == {LIVE}

    # Node a "crashes": its heartbeat lapses. The next node to beat clears it: u2 left, u1 stays (b's entry).
    await redis.zadd(presence_nodes_key(), {a.node_id: 1}, xx=True)
    await b._heartbeat()
    with anyio.fail_after(5):  # another gateway on this Redis may have taken the clearing
        while await redis.zscore(presence_nodes_key(), a.node_id) is not None:
            await anyio.sleep(0.05)
    assert _log(await redis.xrange(presence_stream_key(job)))[2:] == [("l", "u2")]
    assert await redis.zcard(presence_index_key(job)) == 1  # only b's entry is indexed now
    assert not await redis.exists(presence_node_rooms_key(a.node_id))

    # b's heartbeat goes (as when Redis restarts empty) and its entry with it: its next beat writes it back.
    (entry,) = b._live[job]
    await redis.zrem(presence_nodes_key(), b.node_id)
    await redis.zrem(presence_key(job), entry)
    await b._heartbeat()
    assert _log(await redis.xrange(presence_stream_key(job)))[3:] == [("j", "u1")]
    assert await redis.zscore(presence_key(job), entry) == LIVE
    assert await redis.smembers(presence_node_rooms_key(b.node_id)) == {job.encode()}

    # b's last leave: after the grace its sweep announces u1 left and the room leaves b's list.
    b.leave(job, entry.rsplit(":", 1)[1], _user(1))
    await b._write_leaves()
    await anyio.sleep(0.3)
    await b._sweep_rooms({job})
    assert _log(await redis.xrange(presence_stream_key(job)))[4:] == [("l", "u1")]
    assert not await redis.exists(presence_node_rooms_key(b.node_id))
    await redis.zrem(presence_nodes_key(), b.node_id)


async def test_joined_names_at_most_joined_max_users_and_counts_them_all(redis) -> None:
    """A join into a crowded room costs the same as into a small one: the list is capped, the count is not."""
    from progress_service.gateway.presence import JOINED_MAX  # noqa: PLC0415

    job = uuid.uuid4().hex[:12]
    node = Presence(redis, f"node-{job}", grace=1.0)
    await node.load_scripts()
    crowd = [_user(i) for i in range(JOINED_MAX + 150)]
    await _join_batch(node, redis, job, crowd)
    late = _user(999)
    node.start_batch()
    async with redis.pipeline(transaction=True) as pipe:
        node.queue_join(pipe, job, "late", late)
        (reply,) = await pipe.execute()
    observed = node.observe(job, late, reply)
    assert observed is not None
    _log_id, listed, count = observed
    assert count == JOINED_MAX + 151
    assert len(listed) == JOINED_MAX
    assert listed[0].userId == "u999"  # the joining user first, then in join order
    assert [m.userId for m in listed[1:]] == [f"u{i}" for i in range(JOINED_MAX - 1)]
