"""Who is in a room, kept in Redis so every gateway node sees the same members.

Layout (same hash tag as the job, so one Cluster slot):

- ``ps:{job:<id>}:presence`` — a sorted set of connection entries
  ``<userId>\\x1f<userName>\\x1f<node>:<connection>``, scored :data:`LIVE`
  while the connection is in the room, then by the epoch ms at which it
  expires (its leave plus the grace).

Upkeep costs what changed, not how many rooms or members there are: a node
renews one heartbeat (``ps:presence:nodes``, node -> expiry) every
``TTL / 3`` and keeps the set of rooms it has entries in
(``ps:presence:node:<id>:rooms``, written on a room's first local join and
after its last local leave). A node whose heartbeat lapsed is dead: the
first node to notice clears its entries in each of its rooms and announces
who left. A node that finds its own heartbeat gone (Redis restarted empty,
or it was thought dead while stalled) writes its entries back.
- ``ps:{job:<id>}:presence-log`` — a small capped stream of changes
  (field ``j`` = joined member, ``l`` = left member, JSON). Every node's hub
  XREADs it alongside the job's event stream and fans it out as ``presence``.

Why a stream and not pub/sub: pub/sub loses what is published while a
subscriber reconnects, and the hub already resumes streams by id after a
Redis error; why not the job's event stream: presence is not part of the
job's history and must not be replayed or fill its retention.

Leaving sets the entry's expiry to now + ``presence_grace`` instead of
deleting it: a user who reconnects within the grace still counts as present,
so no ``joined``/``left`` pair flaps. A sweep (an atomic script) removes
expired entries and announces ``left`` for users with no entry left; joining
(another script) announces ``joined`` only for a user not already present.

Redis round trips are per node, not per connection: a join's script rides in
the session's one join MULTI (:meth:`Presence.queue_join`), and the presence
task writes all pending leaves in one pipeline and refreshes every local
entry with one script call per room, all rooms in one pipeline.

Why one module of ~440 lines: a quarter of it is the Lua scripts, which are
the layout above made atomic; each is called a few lines below with the keys
and arguments it expects, so the scripts and :class:`Presence` read together.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Iterable
from itertools import islice
import logging
from typing import Any, cast

import anyio
import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from progress_service.events import PresenceMember
from progress_service.ids import now_ms
from progress_service.keys import (
    presence_cleanup_key,
    presence_index_key,
    presence_key,
    presence_node_rooms_key,
    presence_nodes_key,
    presence_stream_key,
)
from progress_service.store.identity import Principal
from progress_service.streams import NOTIFY_LUA

log = logging.getLogger("progress_service.gateway.presence")

SEP = "\x1f"
#: Seconds a node's heartbeat stays valid by default (``PS_PRESENCE_NODE_TTL``);
#: renewed every third of it. A node silent this long is dead and its users
#: are announced left.
TTL = 30.0
#: Score of a connection's entry while it is in the room (its node's
#: heartbeat vouches for it; see the module docstring).
LIVE = 2**52
#: Seconds between renewals of the expiry of this node's rooms' presence keys
#: (a last-resort bound: keys of rooms nobody is in vanish after KEY_TTL).
TOUCH_EVERY = 6 * 3600.0
#: Presence changes kept per room (they are not replayed; this only bounds memory).
LOG_MAXLEN = 200
#: Presence keys of a room idle this long disappear.
KEY_TTL = 24 * 3600

_enc = msgspec.json.Encoder()
#: Commands per pipeline at most (bounds one round trip's size).
PIPELINE_MAX = 1000
#: A join reads at most this many presence-log entries since the node's view; more: the whole set.
DELTA_MAX = 64
#: A ``joined`` names at most this many members (the joining user first) and
#: counts the rest: a join then costs the same in a room of 5,000 as in a room
#: of 5 (the whole list made a join storm into one room quadratic).
JOINED_MAX = 100
_member_dec = msgspec.json.Decoder(PresenceMember)

# Lua: does a user (entry prefix ``<userId>\x1f``) have a live entry? Looked
# up in the room's lex index (``<presence key>-idx``: the same entries, score
# 0, derived from KEYS[1] so it shares the slot), O(log n + that user's
# entries), instead of scanning every member: a join storm into one hot room
# stays linear.
_LIVE_OF = """
local function live_of(set, idx, prefix, now)
  local mine = redis.call('ZRANGEBYLEX', idx, '[' .. prefix, '(' .. prefix .. '\\255')
  for _, m in ipairs(mine) do
    local score = redis.call('ZSCORE', set, m)
    if score and tonumber(score) > now then return true end
  end
  return false
end
"""

# KEYS: presence set, presence log
# ARGV: entry, user prefix, expiry, now, log maxlen, member JSON, key ttl,
#       '1' when this node already holds a live entry of the user (no scan),
#       the caller's view of the log: '' (chained: it derives the members from
#       this reply itself), '0' (none: send them all), or the log id it is at
#       (send the log entries after it, or them all if those were trimmed).
# Returns {log id, 1 if this join announced the user, mode, data}: mode 'n'
# (nothing), 'd' (log entries after the caller's id) or 'f' (live entries).
_JOIN = """
""" + _LIVE_OF + """
local idx = KEYS[1] .. '-idx'
local present = ARGV[8] == '1' or live_of(KEYS[1], idx, ARGV[2], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', idx, 0, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', idx, ARGV[7])
local id
local added = 0
if not present then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'j', ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
  added = 1
  """ + NOTIFY_LUA + """
else
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then id = last[1][1] else id = '0-0' end
end
local known = ARGV[9]
if known == '' then return {id, added, 'n', false} end
if known ~= '0' then
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  local km, ks = string.match(known, '^(%d+)-(%d+)$')
  if #oldest > 0 and km then
    local om, os = string.match(oldest[1][1], '^(%d+)-(%d+)$')
    km, ks, om, os = tonumber(km), tonumber(ks), tonumber(om), tonumber(os)
    if om < km or (om == km and os <= ks) then
      local delta = redis.call('XRANGE', KEYS[2], '(' .. known, '+', 'COUNT', ARGV[10] + 1)
      if #delta <= tonumber(ARGV[10]) then return {id, added, 'd', delta} end
    end
  end
end
return {id, added, 'f', redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf')}
"""

_SWEEP = """
""" + _LIVE_OF + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone == 0 then return 0 end
local idx = KEYS[1] .. '-idx'
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, m in ipairs(gone) do redis.call('ZREM', idx, m) end
local done = {}
local n = 0
for _, m in ipairs(gone) do
  local sep = string.find(m, '\\31', 1, true)
  if sep then
    local uid = string.sub(m, 1, sep)
    if not done[uid] then
      done[uid] = true
      if not live_of(KEYS[1], idx, uid, tonumber(ARGV[1])) then
        local rest = string.sub(m, sep + 1)
        local sep2 = string.find(rest, '\\31', 1, true) or (#rest + 1)
        local body = cjson.encode({userId = string.sub(uid, 1, #uid - 1), userName = string.sub(rest, 1, sep2 - 1)})
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'l', body)
        n = n + 1
      end
    end
  end
end
if n > 0 then """ + NOTIFY_LUA + """ end
return n
"""


# Writes this node's live entries of a room back (after its heartbeat was
# found gone: Redis restarted empty, or the node was thought dead and
# cleared); re-announces a user none of whose entries is live any more.
# Reads only these entries and, for a user whose own entry lapsed, the
# user's index range.
_READD = """
""" + _LIVE_OF + """
local idx = KEYS[1] .. '-idx'
local now = tonumber(ARGV[1])
local seen = {}
local n = 0
for i = 5, #ARGV do
  local m = ARGV[i]
  local sep = string.find(m, '\\31', 1, true)
  if sep then
    local uid = string.sub(m, 1, sep)
    if not seen[uid] then
      seen[uid] = true
      local score = redis.call('ZSCORE', KEYS[1], m)
      if not (score and tonumber(score) > now) and not live_of(KEYS[1], idx, uid, now) then
        local rest = string.sub(m, sep + 1)
        local sep2 = string.find(rest, '\\31', 1, true) or (#rest + 1)
        local body = cjson.encode({userId = string.sub(uid, 1, #uid - 1), userName = string.sub(rest, 1, sep2 - 1)})
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'j', body)
        redis.call('EXPIRE', KEYS[2], ARGV[4])
        n = n + 1
      end
    end
    redis.call('ZADD', KEYS[1], ARGV[2], m)
    redis.call('ZADD', idx, 0, m)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', idx, ARGV[4])
if n > 0 then """ + NOTIFY_LUA + """ end
return n
"""

# Expires a dead node's entries of a room (the sweep that follows removes
# them and announces who left). KEYS: presence set. ARGV: '\31<node>:'.
_DROP_NODE = """
local n = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.find(m, ARGV[1], 1, true) then
    redis.call('ZADD', KEYS[1], 'XX', 0, m)
    n = n + 1
  end
end
return n
"""

# This node's heartbeat, on Redis's clock (one clock for every node).
# KEYS: the nodes set. ARGV: node id, ttl ms.
# Returns {1 if the node was not there (its entries may be gone), dead nodes}.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {added, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)}
"""


def _entry(principal: Principal, node_id: str, conn_id: str) -> str:
    name = principal.user_name.replace(SEP, " ")
    return f"{principal.user_id}{SEP}{name}{SEP}{node_id}:{conn_id}"



#: Decoded presence entries, by their raw bytes (entries never change).
#: Every join reads all of its room's entries, so a mass join decodes each
#: one again and again (5,000 joins in rooms of 50: ~125,000 decodes, 11 %
#: of the connect profile); the decoded member is shared instead.
_decoded: dict[bytes, tuple[str, PresenceMember]] = {}
#: Past this many the cache starts over (an entry is ~200 bytes).
DECODED_MAX = 50_000


def _decode_entry(raw: bytes) -> tuple[str, PresenceMember]:
    user_id, name, _ = raw.decode().split(SEP, 2)
    found = (user_id, PresenceMember(userId=user_id, userName=name))
    if len(_decoded) >= DECODED_MAX:
        _decoded.clear()
    _decoded[raw] = found
    return found


def members_of(entries: list[bytes]) -> list[PresenceMember]:
    """Distinct users of a list of presence entries, in first-seen order.

    The members returned are shared between calls: treat them as read-only.
    """
    return list(_users_of(entries).values())


def _users_of(entries: list[bytes]) -> dict[str, PresenceMember]:
    seen: dict[str, PresenceMember] = {}
    decoded = _decoded
    for raw in entries:
        found = decoded.get(raw)
        user_id, member = found if found is not None else _decode_entry(raw)
        if user_id not in seen:
            seen[user_id] = member
    return seen


def _listed(users: dict[str, PresenceMember], first: str) -> list[PresenceMember]:
    """Up to :data:`JOINED_MAX` of ``users``: ``first`` (the joining user), then in join order.

    ``islice`` and one ``remove`` instead of a Python loop over the head: in a
    join storm into one room this runs once per join.
    """
    me = users.get(first)
    head = list(islice(users.values(), JOINED_MAX))
    if me is None:
        return head
    try:
        head.remove(me)  # userId is unique in ``users``: removes ``me`` only
    except ValueError:
        head.pop()  # ``me`` joined after the first JOINED_MAX: make room for it
    head.insert(0, me)
    return head


class Presence:
    """This node's presence entries and the one task that writes leaves, beats and sweeps."""

    def __init__(self, redis: Redis, node_id: str, *, grace: float, ttl: float = TTL) -> None:
        self.redis = redis
        self.node_id = node_id
        self.grace = grace
        #: Seconds this node's heartbeat stays valid (``PS_PRESENCE_NODE_TTL``).
        self.ttl = ttl
        self._join = redis.register_script(_JOIN)
        self._sweep = redis.register_script(_SWEEP)
        self._readd = redis.register_script(_READD)
        self._drop_node = redis.register_script(_DROP_NODE)
        self._beat = redis.register_script(_BEAT)
        #: job id -> entries of live local connections
        self._live: dict[str, set[str]] = {}
        #: rooms whose first local entry came: to add to this node's rooms in Redis
        self._new_rooms: set[str] = set()
        #: rooms this node has told Redis it has entries in (taken out after their last sweep)
        self._listed_rooms: set[str] = set()
        #: job id -> user id -> live local entries of that user (a join of a user
        #: already here needs no look-up)
        self._local_users: dict[str, dict[str, int]] = {}
        #: job id -> (presence-log id, the room's users as of that id): joins
        #: read only the log entries after it
        self._views: dict[str, tuple[str, dict[str, PresenceMember]]] = {}
        #: rooms that already have a join in the MULTI being built
        self._batch_rooms: set[str] = set()
        #: entries that left and still need their grace expiry written
        self._leaving: list[tuple[str, str]] = []
        #: (monotonic due time, job id) of sweeps to run
        self._due: list[tuple[float, str]] = []
        #: job id -> epoch ms at which this node's last leave there expires
        self._leave_until: dict[str, int] = {}
        self._wakeup = anyio.Event()

    def start_batch(self, rooms: Iterable[str] | None = None) -> None:
        """A new join MULTI is being built (see :meth:`queue_join`); ``rooms``: only for these (one slot's)."""
        if rooms is None:
            self._batch_rooms.clear()
        else:
            self._batch_rooms.difference_update(rooms)

    def queue_join(self, pipe: Pipeline, job_id: str, conn_id: str, principal: Principal) -> str:
        """Add the join script to ``pipe`` (the session's join MULTI); returns the entry.

        Call :meth:`start_batch` before building the MULTI, and pass every
        script reply, in the MULTI's order, to :meth:`observe`; then
        :meth:`joined` for each join that goes ahead. On ``NoScriptError``
        (Redis restarted or flushed its scripts) call :meth:`load_scripts`
        and build the MULTI again.

        Costs no more in a big room than in a small one: a user this node
        already has in the room is not looked up, and the members come as
        the log entries since this node's view of the room (only the first
        join of a room in a MULTI asks; the others follow from its reply).
        """
        entry = _entry(principal, self.node_id, conn_id)
        body = _enc.encode(PresenceMember(userId=principal.user_id, userName=principal.user_name))
        now = now_ms()
        if job_id in self._batch_rooms:
            known = ""
        else:
            self._batch_rooms.add(job_id)
            view = self._views.get(job_id)
            known = view[0] if view is not None else "0"
        local = self._local_users.get(job_id)
        here = "1" if local is not None and local.get(principal.user_id) else "0"
        pipe.evalsha(
            self._join.sha, 2, presence_key(job_id), presence_stream_key(job_id),
            entry, principal.user_id + SEP, LIVE, now, LOG_MAXLEN, body, KEY_TTL,
            here, known, DELTA_MAX,
        )
        return entry

    def observe(self, job_id: str, principal: Principal, reply: object) -> tuple[str, list[PresenceMember], int] | None:
        """Bring this node's view of the room up to a join's reply.

        Returns its presence-log id, the members for ``joined`` (at most
        :data:`JOINED_MAX`, the joining user first) and how many there are.

        Replies must come in MULTI order (each one follows from the one
        before). None when the reply is an error or the view it follows from
        is gone: that join fails (the client retries it).
        """
        if isinstance(reply, Exception):
            self._views.pop(job_id, None)
            return None
        raw_id, added, mode, data = cast("list[Any]", reply)
        log_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        if mode == b"f":
            users = _users_of(data)
        else:
            view = self._views.get(job_id)
            if view is None:
                return None
            users = view[1]
            if mode == b"d":
                for _eid, flat in data:
                    fields = dict(zip(flat[::2], flat[1::2]))
                    if b"j" in fields:
                        m = _member_dec.decode(fields[b"j"])
                        users[m.userId] = m
                    if b"l" in fields:
                        users.pop(_member_dec.decode(fields[b"l"]).userId, None)
            elif added:  # chained: the only change since the previous reply is this join's own
                users[principal.user_id] = PresenceMember(userId=principal.user_id, userName=principal.user_name)
        self._views[job_id] = (log_id, users)
        return log_id, _listed(users, principal.user_id), len(users)

    def joined(self, job_id: str, entry: str, principal: Principal) -> None:
        """Record the live local entry of a join that went ahead (vouched for by the heartbeat until it leaves)."""
        if job_id not in self._listed_rooms:
            self._new_rooms.add(job_id)
            self._wakeup.set()
        self._live.setdefault(job_id, set()).add(entry)
        local = self._local_users.setdefault(job_id, {})
        local[principal.user_id] = local.get(principal.user_id, 0) + 1

    async def load_scripts(self) -> None:
        """Load the scripts into Redis (after a NOSCRIPT answer)."""
        for script in (_JOIN, _SWEEP, _READD, _DROP_NODE, _BEAT):
            await self.redis.script_load(script)

    def leave(self, job_id: str, conn_id: str, principal: Principal) -> None:
        """Leave the room; others hear of it after the grace unless the user comes back.

        Synchronous so that a closing connection never waits on Redis: the
        presence task writes the grace expiry.
        """
        entry = _entry(principal, self.node_id, conn_id)
        live = self._live.get(job_id)
        if live is not None and entry in live:
            live.discard(entry)
            local = self._local_users[job_id]
            local[principal.user_id] -= 1
            if local[principal.user_id] <= 0:
                del local[principal.user_id]
            if not live:
                del self._live[job_id]
                del self._local_users[job_id]
                # No local member left: nothing reads this view until the next
                # join, which starts from the whole set again.
                self._views.pop(job_id, None)
        self._leaving.append((job_id, entry))
        self._wakeup.set()

    async def run(self) -> None:
        """Write leaves, beat, clear dead nodes and sweep expired entries, until cancelled.

        On the way out this node's heartbeat is set to lapse after the grace,
        so another node announces its users left then (or the next node to
        start, if none is left).
        """
        try:
            await self._loop()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                with contextlib.suppress(RedisError, OSError):
                    await self._write_leaves()
                    await self._beat(keys=[presence_nodes_key()], args=[self.node_id, int(self.grace * 1000)])

    async def _loop(self) -> None:
        next_beat = anyio.current_time()
        next_touch = anyio.current_time() + TOUCH_EVERY
        while True:
            due: set[str] = set()
            try:
                await self._write_leaves()
                await self._list_new_rooms()
                now = anyio.current_time()
                if now >= next_beat:
                    await self._heartbeat()
                    next_beat = now + self.ttl / 3
                if now >= next_touch:
                    await self._touch_keys()
                    next_touch = now + TOUCH_EVERY
                while self._due and self._due[0][0] <= now:
                    due.add(heapq.heappop(self._due)[1])
                if due:
                    await self._sweep_rooms(due)
            except (RedisError, OSError) as exc:
                for job_id in due:  # swept again at the next try
                    heapq.heappush(self._due, (anyio.current_time(), job_id))
                if isinstance(exc, NoScriptError):
                    # Redis lost its scripts (restart); a cluster pipeline does not load them itself.
                    with contextlib.suppress(RedisError, OSError):
                        await self.load_scripts()
                    continue
                log.warning("presence: Redis error (%s); retrying", exc)
                await anyio.sleep(1.0)
                continue
            wait = next_beat - anyio.current_time()
            if self._due:
                wait = min(wait, self._due[0][0] - anyio.current_time())
            if self._leaving or self._new_rooms:
                continue
            self._wakeup = anyio.Event()
            with anyio.move_on_after(max(0.01, wait)):
                await self._wakeup.wait()

    async def _write_leaves(self) -> None:
        """Write every pending leave's grace expiry in one pipeline."""
        while self._leaving:
            batch = self._leaving[:PIPELINE_MAX]
            until = now_ms() + int(self.grace * 1000)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, entry in batch:
                    pipe.zadd(presence_key(job_id), {entry: until}, xx=True)
                await pipe.execute()
            del self._leaving[: len(batch)]
            due = anyio.current_time() + self.grace + 0.05
            for job_id in {job_id for job_id, _ in batch}:
                self._leave_until[job_id] = until
                heapq.heappush(self._due, (due, job_id))

    async def _list_new_rooms(self) -> None:
        """Add the rooms that got their first local entry to this node's rooms in Redis."""
        if not self._new_rooms:
            return
        rooms, self._new_rooms = list(self._new_rooms), set()
        try:
            await self.redis.sadd(presence_node_rooms_key(self.node_id), *rooms)
        except BaseException:
            self._new_rooms.update(rooms)
            raise
        self._listed_rooms.update(rooms)

    async def _heartbeat(self) -> None:
        """Renew this node's heartbeat; write its entries back if Redis forgot it; clear dead nodes."""
        added, dead = await self._beat(keys=[presence_nodes_key()], args=[self.node_id, int(self.ttl * 1000)])
        if added and self._live:
            log.info("presence: this node's heartbeat was gone (Redis restarted, or the node stalled); writing its entries back")
            await self._readd_all()
        for raw in dead:
            node = raw.decode() if isinstance(raw, bytes) else str(raw)
            if node != self.node_id:
                await self._clear_node(node)

    async def _readd_all(self) -> None:
        """Write every live local entry back, re-announcing users none of whose entries is left."""
        rooms = [(job_id, list(entries)) for job_id, entries in self._live.items() if entries]
        self._listed_rooms.clear()
        self._new_rooms.update(job_id for job_id, _ in rooms)
        await self._list_new_rooms()
        for i in range(0, len(rooms), PIPELINE_MAX // 2):
            now = now_ms()
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, entries in rooms[i : i + PIPELINE_MAX // 2]:
                    keys = [presence_key(job_id), presence_stream_key(job_id)]
                    await self._readd(keys=keys, args=[now, LIVE, LOG_MAXLEN, KEY_TTL, *entries], client=pipe)
                await pipe.execute()

    async def _clear_node(self, node: str) -> None:
        """Clear a dead node's entries in each of its rooms, announcing who left (one node does it)."""
        redis = self.redis
        if not await redis.set(presence_cleanup_key(node), self.node_id, nx=True, ex=60):
            return  # another node is at it
        rooms = [r.decode() if isinstance(r, bytes) else str(r) for r in await redis.smembers(presence_node_rooms_key(node))]
        mark = f"{SEP}{node}:"
        for i in range(0, len(rooms), PIPELINE_MAX // 2):
            now = now_ms()
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in rooms[i : i + PIPELINE_MAX // 2]:
                    await self._drop_node(keys=[presence_key(job_id)], args=[mark], client=pipe)
                    await self._sweep(keys=[presence_key(job_id), presence_stream_key(job_id)], args=[now, LOG_MAXLEN], client=pipe)
                await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            pipe.delete(presence_node_rooms_key(node))
            pipe.zrem(presence_nodes_key(), node)
            pipe.delete(presence_cleanup_key(node))
            await pipe.execute()
        log.info("presence: node %s stopped beating; cleared its entries in %d room(s)", node, len(rooms))

    async def _touch_keys(self) -> None:
        """Renew the expiry of this node's rooms' presence keys (rare: every TOUCH_EVERY)."""
        rooms = list(self._live)
        for i in range(0, len(rooms), PIPELINE_MAX // 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in rooms[i : i + PIPELINE_MAX // 2]:
                    pipe.expire(presence_key(job_id), KEY_TTL)
                    pipe.expire(presence_index_key(job_id), KEY_TTL)
                await pipe.execute()

    async def _sweep_rooms(self, job_ids: set[str]) -> None:
        """Sweep expired entries of these rooms (one pipeline); rooms left for good leave this node's list."""
        now = now_ms()
        # A room leaves the list only once this node's last leave there has
        # expired: that sweep removes its last entry (nobody would sweep it later).
        ready = {job_id for job_id in job_ids if self._leave_until.get(job_id, 0) <= now}
        for job_id in job_ids - ready:
            heapq.heappush(self._due, (anyio.current_time() + (self._leave_until[job_id] - now) / 1000 + 0.05, job_id))
        gone = [job_id for job_id in ready if job_id not in self._live and job_id in self._listed_rooms]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                await self._sweep(keys=[presence_key(job_id), presence_stream_key(job_id)], args=[now, LOG_MAXLEN], client=pipe)
            if gone:
                pipe.srem(presence_node_rooms_key(self.node_id), *gone)
            await pipe.execute()
        for job_id in ready:
            self._leave_until.pop(job_id, None)
        for job_id in gone:
            if job_id not in self._live:
                self._listed_rooms.discard(job_id)
            else:  # joined again meanwhile: list it again
                self._new_rooms.add(job_id)
