"""Who is in a room, kept in Redis so every gateway node sees the same members.

Layout (same hash tag as the job, so one Cluster slot):

- ``ps:{job:<id>}:presence`` — a sorted set of connection entries
  ``<userId>\\x1f<userName>\\x1f<node>:<connection>``, scored by the epoch ms at
  which the entry expires. Live connections are refreshed by their node every
  ``TTL / 3``; a crashed node's entries simply expire.
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
"""

from __future__ import annotations

import heapq
import logging
import time

import anyio
import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from progress_service.events import PresenceMember
from progress_service.gateway.hub import presence_stream_key
from progress_service.store.identity import Principal
from progress_service.streams import presence_key

log = logging.getLogger("progress_service.gateway.presence")

SEP = "\x1f"
#: Seconds a live entry stays valid without a refresh.
TTL = 30.0
#: Presence changes kept per room (they are not replayed; this only bounds memory).
LOG_MAXLEN = 200
#: Presence keys of a room idle this long disappear.
KEY_TTL = 24 * 3600

_enc = msgspec.json.Encoder()
#: Commands per pipeline at most (bounds one round trip's size).
PIPELINE_MAX = 1000

_JOIN = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf')
local present = false
for _, m in ipairs(live) do
  if string.sub(m, 1, #ARGV[2]) == ARGV[2] then present = true; break end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
local id
if not present then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'j', ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
else
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then id = last[1][1] else id = '0-0' end
end
return {id, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf')}
"""

_SWEEP = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone == 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local done = {}
local n = 0
for _, m in ipairs(gone) do
  local sep = string.find(m, '\\31', 1, true)
  if sep then
    local uid = string.sub(m, 1, sep)
    if not done[uid] then
      done[uid] = true
      local still = false
      for _, l in ipairs(live) do
        if string.sub(l, 1, #uid) == uid then still = true; break end
      end
      if not still then
        local rest = string.sub(m, sep + 1)
        local sep2 = string.find(rest, '\\31', 1, true) or (#rest + 1)
        local body = cjson.encode({userId = string.sub(uid, 1, #uid - 1), userName = string.sub(rest, 1, sep2 - 1)})
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'l', body)
        n = n + 1
      end
    end
  end
end
return n
"""


_REFRESH = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')
local present = {}
for _, m in ipairs(live) do
  local sep = string.find(m, '\\31', 1, true)
  if sep then present[string.sub(m, 1, sep)] = true end
end
local n = 0
for i = 5, #ARGV do
  local m = ARGV[i]
  local sep = string.find(m, '\\31', 1, true)
  if sep then
    local uid = string.sub(m, 1, sep)
    if not present[uid] then
      present[uid] = true
      local rest = string.sub(m, sep + 1)
      local sep2 = string.find(rest, '\\31', 1, true) or (#rest + 1)
      local body = cjson.encode({userId = string.sub(uid, 1, #uid - 1), userName = string.sub(rest, 1, sep2 - 1)})
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'j', body)
      redis.call('EXPIRE', KEYS[2], ARGV[4])
      n = n + 1
    end
    redis.call('ZADD', KEYS[1], ARGV[2], m)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return n
"""


def _entry(principal: Principal, node_id: str, conn_id: str) -> str:
    name = principal.user_name.replace(SEP, " ")
    return f"{principal.user_id}{SEP}{name}{SEP}{node_id}:{conn_id}"


def _ms() -> int:
    return int(time.time() * 1000)


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
    seen: dict[str, PresenceMember] = {}
    decoded = _decoded
    for raw in entries:
        found = decoded.get(raw)
        user_id, member = found if found is not None else _decode_entry(raw)
        if user_id not in seen:
            seen[user_id] = member
    return list(seen.values())


class Presence:
    """This node's presence entries and the one task that refreshes and sweeps them."""

    def __init__(self, redis: Redis, node_id: str, *, grace: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.grace = grace
        self._join = redis.register_script(_JOIN)
        self._sweep = redis.register_script(_SWEEP)
        self._refresh_script = redis.register_script(_REFRESH)
        #: job id -> entries of live local connections (refreshed)
        self._live: dict[str, set[str]] = {}
        #: entries that left and still need their grace expiry written
        self._leaving: list[tuple[str, str]] = []
        #: (monotonic due time, job id) of sweeps to run
        self._due: list[tuple[float, str]] = []
        self._wakeup = anyio.Event()

    async def join(self, job_id: str, conn_id: str, principal: Principal) -> tuple[str, list[PresenceMember]]:
        """Enter the room; returns the presence-log id already reflected and the members."""
        entry = _entry(principal, self.node_id, conn_id)
        body = _enc.encode(PresenceMember(userId=principal.user_id, userName=principal.user_name))
        now = _ms()
        last_id, entries = await self._join(
            keys=[presence_key(job_id), presence_stream_key(job_id)],
            args=[entry, principal.user_id + SEP, now + int(TTL * 1000), now, LOG_MAXLEN, body, KEY_TTL],
        )
        self._live.setdefault(job_id, set()).add(entry)
        return last_id.decode() if isinstance(last_id, bytes) else last_id, members_of(entries)

    def queue_join(self, pipe: Pipeline, job_id: str, conn_id: str, principal: Principal) -> str:
        """Add the join script to ``pipe`` (the session's join MULTI); returns the entry.

        Pass the script's reply to :meth:`joined` once the pipeline ran. On
        ``NoScriptError`` (Redis restarted or flushed its scripts) call
        :meth:`load_scripts` and run the pipeline again.
        """
        entry = _entry(principal, self.node_id, conn_id)
        body = _enc.encode(PresenceMember(userId=principal.user_id, userName=principal.user_name))
        now = _ms()
        pipe.evalsha(
            self._join.sha, 2, presence_key(job_id), presence_stream_key(job_id),
            entry, principal.user_id + SEP, now + int(TTL * 1000), now, LOG_MAXLEN, body, KEY_TTL,
        )
        return entry

    def joined(self, job_id: str, entry: str, reply: list) -> tuple[str, list[PresenceMember]]:
        """Record a join queued with :meth:`queue_join`; the presence-log id and the members."""
        last_id, entries = reply
        self._live.setdefault(job_id, set()).add(entry)
        return last_id.decode() if isinstance(last_id, bytes) else last_id, members_of(entries)

    async def load_scripts(self) -> None:
        """Load the scripts into Redis (after a NOSCRIPT answer)."""
        for script in (_JOIN, _SWEEP, _REFRESH):
            await self.redis.script_load(script)

    def leave(self, job_id: str, conn_id: str, principal: Principal) -> None:
        """Leave the room; others hear of it after the grace unless the user comes back.

        Synchronous so that a closing connection never waits on Redis: the
        presence task writes the grace expiry.
        """
        entry = _entry(principal, self.node_id, conn_id)
        live = self._live.get(job_id)
        if live is not None:
            live.discard(entry)
            if not live:
                del self._live[job_id]
        self._leaving.append((job_id, entry))
        self._wakeup.set()

    async def run(self) -> None:
        """Write leaves, refresh live entries and sweep expired ones, until cancelled."""
        next_refresh = anyio.current_time() + TTL / 3
        while True:
            try:
                await self._write_leaves()
                now = anyio.current_time()
                if now >= next_refresh:
                    await self._refresh()
                    next_refresh = now + TTL / 3
                due: set[str] = set()
                while self._due and self._due[0][0] <= now:
                    due.add(heapq.heappop(self._due)[1])
                if due:
                    await self._sweep_rooms(due)
            except (RedisError, OSError) as exc:
                log.warning("presence: Redis error (%s); retrying", exc)
                await anyio.sleep(1.0)
                continue
            wait = next_refresh - anyio.current_time()
            if self._due:
                wait = min(wait, self._due[0][0] - anyio.current_time())
            if self._leaving:
                continue
            self._wakeup = anyio.Event()
            with anyio.move_on_after(max(0.01, wait)):
                await self._wakeup.wait()

    async def _write_leaves(self) -> None:
        """Write every pending leave's grace expiry in one pipeline."""
        while self._leaving:
            batch = self._leaving[:PIPELINE_MAX]
            until = _ms() + int(self.grace * 1000)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, entry in batch:
                    pipe.zadd(presence_key(job_id), {entry: until}, xx=True)
                await pipe.execute()
            del self._leaving[: len(batch)]
            due = anyio.current_time() + self.grace + 0.05
            for job_id in {job_id for job_id, _ in batch}:
                heapq.heappush(self._due, (due, job_id))

    async def _refresh(self) -> None:
        """Extend live entries (re-announcing a user whose entry was swept meanwhile).

        One script call per room (all of the room's local entries) and all
        rooms in one pipeline: a refresh costs a round trip per node.
        """
        rooms = [(job_id, list(entries)) for job_id, entries in self._live.items() if entries]
        for i in range(0, len(rooms), PIPELINE_MAX // 2):
            now = _ms()
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, entries in rooms[i : i + PIPELINE_MAX // 2]:
                    keys = [presence_key(job_id), presence_stream_key(job_id)]
                    await self._refresh_script(keys=keys, args=[now, now + int(TTL * 1000), LOG_MAXLEN, KEY_TTL, *entries], client=pipe)
                    # entries of crashed nodes expire: announce them to the room
                    await self._sweep(keys=keys, args=[now, LOG_MAXLEN], client=pipe)
                await pipe.execute()

    async def _sweep_rooms(self, job_ids: set[str]) -> None:
        """Sweep expired entries of these rooms (one pipeline)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            now = _ms()
            for job_id in job_ids:
                await self._sweep(keys=[presence_key(job_id), presence_stream_key(job_id)], args=[now, LOG_MAXLEN], client=pipe)
            await pipe.execute()
