"""A job's event stream and snapshot in Redis: the entries and how they are read and written.

The keys and their hash-tag rule are in :mod:`progress_service.keys`. A stream entry has
the fields ``t`` (``event`` or ``chat``), ``b`` (the JSON body without
``id`` and ``roomId``) and, from the publisher's and the comments' scripts,
``p``: the id of the entry before it in the stream when it was added (``''``:
the stream was empty). ``p`` lets a live reader see that entries between its
cursor and what it read were trimmed (or lost with Redis) and fetch them
from the archive (``gateway/hub.py``); it never goes on the wire. The entry id is the protocol's event id, so resume is
``XRANGE key (since +``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from progress_service.events import JobSnapshot, StoredChat, StoredEvent
from progress_service.keys import events_key, snapshot_key

_enc = msgspec.json.Encoder()
_snapshot_dec = msgspec.json.Decoder(JobSnapshot)
_body_dec = msgspec.json.Decoder(dict[str, Any])

Entry = tuple[bytes, dict[bytes, bytes]]


#: Lua: tell the room's readers that the stream behind KEYS[1] gained entries
#: (the channel, ``keys.news_channel``, is derived from the key, so it is in
#: the key's slot). Sharded pub/sub where the server has it (Redis 7); plain
#: PUBLISH on Redis 6.2, whose readers SUBSCRIBE instead (gateway/broker.py
#: asks the server).
NOTIFY_LUA = (
    "do local ch = string.gsub(KEYS[1], ':[%a-]+$', ':news'); "
    "local r = redis.pcall('SPUBLISH', ch, ''); "
    "if type(r) == 'table' and r.err then redis.call('PUBLISH', ch, '') end end"
)
#: The same as a script of its own, for MULTIs (KEYS: any key of the job).
NOTIFY = NOTIFY_LUA + " return 0"


def encode_snapshot(snapshot: JobSnapshot) -> bytes:
    return _enc.encode(snapshot)


def decode_snapshot(raw: bytes) -> JobSnapshot:
    return _snapshot_dec.decode(raw)


def encode_event(event: StoredEvent) -> bytes:
    """An event's entry body (field ``b``), as Redis and the archive hold it."""
    return _enc.encode(event)


async def append_event(
    redis: Redis,
    job_id: str,
    event: StoredEvent,
    *,
    maxlen: int | None = None,
    snapshot: JobSnapshot | None = None,
) -> str:
    """Append one job event (and the snapshot it leads to) atomically.

    Returns the new entry id. The snapshot and the stream change in one
    MULTI, so a reader that takes both in one MULTI never sees them disagree.
    The service passes no ``maxlen``: a job's stream is trimmed only below
    what the archive holds (:func:`trim_archived`). ``maxlen`` (``MAXLEN ~``)
    is for streams without an archive (benchmarks, tests).
    """
    key = events_key(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(key, {"t": b"event", "b": encode_event(event)}, maxlen=maxlen, approximate=maxlen is not None)
        # Count of entries ever added: with XLEN it tells whether the stream
        # was trimmed, which decides a `gap` on resume (Redis 6.2 has no
        # max-deleted-entry-id to ask).
        pipe.hincrby(snapshot_key(job_id), "n", 1)
        # "k": this Redis has held the stream since its first entry (see
        # `coverage`). Set by the job's first event (submit); a stream that
        # Redis lost and that the publisher or a comment starts again lacks it.
        pipe.hsetnx(snapshot_key(job_id), "k", 1)
        if snapshot is not None:
            pipe.hset(snapshot_key(job_id), "s", encode_snapshot(snapshot))
        pipe.eval(NOTIFY, 1, key)  # the hubs read rooms with news (gateway/broker.py)
        res = await pipe.execute()
    return _s(res[0])


# Appends a publisher's batch of events, each at most once (see worker/publisher.py).
# KEYS: events stream, snapshot hash
# ARGV: '' (unused: the stream is trimmed by `TRIM_ARCHIVED`, never here),
#       publisher token, first seq, floor id ('' none), snapshot ('' none),
#       '1' when this publisher appended before ('' else),
#       then (body, wanted id or '') per event; the events have seqs first, first+1, ...
# Returns the id of each event (false: a wanted id that no longer fits), or
# {'lost'} when Redis forgot this publisher's earlier appends.
# An event whose seq this publisher already appended (a retry after a lost
# reply) is not added again: its id comes from the publisher's record of the
# seqs it has not confirmed yet (those from `first` on). New ids are greater
# than the stream's last id and the floor (the publisher's last id: a Redis
# that lost the stream must not hand out older ids). A wanted id (an event
# this Redis lost, put back) is used when it still fits at the stream's end.
APPEND_EVENTS = """
local tok = ARGV[2]
local first = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[2], 'p:' .. tok)
if ARGV[6] == '1' and (not state or tonumber(state) < first - 1) then
  -- This publisher appended here before (seqs below `first` are confirmed),
  -- and Redis forgot some of it (restarted empty or from an older AOF,
  -- flushed, key evicted): append nothing; the publisher puts back what it can.
  return {'lost'}
end
local done = tonumber(state or '0')
local known = {}
local raw = redis.call('HGET', KEYS[2], 'pi:' .. tok)
if raw then
  for _, pair in ipairs(cjson.decode(raw)) do known[pair[1]] = pair[2] end
end
local tms, tseq = -1, -1
local function bump(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  ms, sq = tonumber(ms), tonumber(sq)
  if ms > tms or (ms == tms and sq > tseq) then tms, tseq = ms, sq end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then bump(last[1][1]); prev = last[1][1] end
if ARGV[4] ~= '' then bump(ARGV[4]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, keep, added = {}, {}, 0
local i = 7
local seq = first
while i <= #ARGV do
  local body, want = ARGV[i], ARGV[i + 1]
  local id = false
  if seq <= done then
    id = known[seq] or false
  else
    local wms, wsq = string.match(want, '^(%d+)-(%d+)$')
    if wms then
      -- put back with its own id, or not at all (it is in the archive)
      if tonumber(wms) > tms or (tonumber(wms) == tms and tonumber(wsq) > tseq) then id = want end
    elseif now > tms then
      id = string.format('%d-0', now)
    else
      id = string.format('%d-%d', tms, tseq + 1)
    end
    if id then
      -- No MAXLEN: an entry leaves Redis only once the archive holds it (TRIM_ARCHIVED).
      redis.call('XADD', KEYS[1], id, 't', 'event', 'b', body, 'p', prev)
      prev = id
      bump(id)
      added = added + 1
    end
    done = seq
  end
  out[#out + 1] = id
  keep[#keep + 1] = {seq, id}
  i = i + 2
  seq = seq + 1
end
redis.call('HSET', KEYS[2], 'p:' .. tok, done, 'pi:' .. tok, cjson.encode(keep))
if added > 0 then redis.call('HINCRBY', KEYS[2], 'n', added) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 's', ARGV[5]) end
if added > 0 then """ + NOTIFY_LUA + """ end
return out
"""


# Trims a job's stream below what the archive holds, keeping some archived entries.
# KEYS: events stream
# ARGV: the newest archived id, archived entries to keep (at least 1),
#       milliseconds every entry stays at least (by the Redis clock)
# Removes the entries older than the ARGV[2]-th newest entry at or below
# ARGV[1] and older than ARGV[3] ms; entries above ARGV[1] (not archived
# yet) are never touched. Returns the number of entries removed.
# It reads what it removes and the entries above ARGV[1], never the ARGV[2]
# it keeps: the publisher calls it after every archive commit, and reading
# the 10,000 kept entries each time cost Redis ~2.5 ms per call.
TRIM_ARCHIVED = """
local keep = math.max(1, tonumber(ARGV[2]))
local over = redis.call('XLEN', KEYS[1]) - keep
if over <= 0 then return 0 end
local above = #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', over)
local drop = over - above
if drop <= 0 then return 0 end
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', drop + 1)
local minid = oldest[drop + 1][1]
local t = redis.call('TIME')
local young = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
local ms = tonumber(string.match(minid, '^(%d+)-'))
if ms > young then minid = string.format('%d-0', math.max(0, young)) end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"""


async def trim_archived(redis: Redis, job_id: str, archived_upto: str, *, keep: int, keep_ms: int = 0) -> int:
    """Remove the stream's entries the archive holds, except the ``keep`` newest and those younger than ``keep_ms``.

    The only trimming of a job's stream (the publisher calls it after each
    archive commit, with ``PS_EVENTS_MAXLEN`` and ``PS_EVENTS_KEEP_SECONDS``):
    every entry above ``archived_upto`` stays, so a reader always finds an
    entry in Redis or in the store (see ``history.read_page``), and a live
    reader that lags less than ``keep_ms`` misses nothing. Returns how many
    were removed.
    """
    removed = await redis.eval(TRIM_ARCHIVED, 1, events_key(job_id), archived_upto, keep, keep_ms)
    return int(removed or 0)


async def append_chat(redis: Redis, job_id: str, chat: StoredChat, *, maxlen: int | None = None) -> str:
    """Append a comment to the job's stream, in order (tests; the service's comments use ``comments``)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(events_key(job_id), {"t": b"chat", "b": _enc.encode(chat)}, maxlen=maxlen, approximate=maxlen is not None)
        pipe.hincrby(snapshot_key(job_id), "n", 1)
        pipe.eval(NOTIFY, 1, events_key(job_id))
        res = await pipe.execute()
    return _s(res[0])


async def put_snapshot(redis: Redis, job_id: str, snapshot: JobSnapshot) -> None:
    """Write the snapshot alone (used when a job is created)."""
    await redis.hset(snapshot_key(job_id), "s", encode_snapshot(snapshot))


async def read_state(redis: Redis, job_id: str) -> tuple[JobSnapshot | None, str | None]:
    """The job's snapshot and its stream head, read together in one MULTI."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(snapshot_key(job_id), "s")
        pipe.xrevrange(events_key(job_id), count=1)
        raw, last = await pipe.execute()
    snapshot = decode_snapshot(raw) if raw else None
    head = _s(last[0][0]) if last else None
    if snapshot is not None:
        snapshot.lastEventId = head
    return snapshot, head


async def replay(redis: Redis, job_id: str, since: str | None, *, count: int = 1000) -> list[Entry]:
    """Entries after ``since`` (exclusive), oldest first, at most ``count``."""
    start = f"({since}" if since else "-"
    entries: list[Entry] = await redis.xrange(events_key(job_id), min=start, max="+", count=count)
    return entries


async def replay_covered(
    redis: Redis, job_id: str, since: str | None, *, count: int = 1000
) -> tuple[list[Entry], Coverage, int]:
    """:func:`replay` and :func:`coverage` in one MULTI: the entries, what Redis held when it read them, and when.

    The reader needs both from the same instant: entries older than the
    coverage's ``holds_from`` were trimmed before this read, so the archive
    holds them (``history.read_page``). The third value is the Redis clock
    (epoch ms) at the read: every entry appended after it has an id at or
    above it (ids come from that clock, or from a floor above it).
    """
    key = events_key(job_id)
    start = f"({since}" if since else "-"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xrange(key, min=start, max="+", count=count)
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
        pipe.xlen(key)
        pipe.hmget(snapshot_key(job_id), "n", "k")
        pipe.time()
        entries, first, last, length, (added, whole), (secs, micros) = await pipe.execute()
    return entries, coverage_of(first, last, length, added, whole), int(secs) * 1000 + int(micros) // 1000


class Coverage(msgspec.Struct, frozen=True):
    """What Redis holds of a job's stream (see :func:`coverage_of`)."""

    #: The stream's last id (None: empty or missing).
    head: str | None
    #: Redis holds every entry from this id on; None: every entry of the
    #: job's history (the stream is whole since its first entry). "" when
    #: Redis holds nothing and cannot say it never had anything.
    holds_from: str | None
    #: Redis trimmed entries of this stream (archived ones, see ``trim_archived``) that it once held.
    trimmed: bool = False


def coverage_of(first: list[Any], last: list[Any], length: int, added: Any, whole: Any) -> Coverage:
    """Coverage from the replies of ``XRANGE - + COUNT 1``, ``XREVRANGE + - COUNT 1``, ``XLEN``, ``HMGET n k``.

    The stream is whole when this Redis wrote its first entry (``k``) and
    trimmed none (entries ever added equal the length). Otherwise Redis
    holds from its oldest entry on, and what is older is in the store.
    """
    head = _s(last[0][0]) if last else None
    oldest = _s(first[0][0]) if first else None
    trimmed = int(added or 0) > int(length)
    if whole and not trimmed:
        return Coverage(head=head, holds_from=None)
    return Coverage(head=head, holds_from=oldest or "", trimmed=trimmed)


async def coverage(redis: Redis, job_id: str) -> Coverage:
    """What Redis holds of the job's stream, read in one MULTI."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xrange(events_key(job_id), count=1)
        pipe.xrevrange(events_key(job_id), count=1)
        pipe.xlen(events_key(job_id))
        pipe.hmget(snapshot_key(job_id), "n", "k")
        first, last, length, (added, whole) = await pipe.execute()
    return coverage_of(first, last, length, added, whole)


def id_tuple(entry_id: str) -> tuple[int, int]:
    """Parse a stream id ``ms-seq`` for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_lt(a: str, b: str) -> bool:
    """``a`` is strictly older than ``b``."""
    return id_tuple(a) < id_tuple(b)


async def expire_job(redis: Redis, job_id: str, ttl: int) -> None:
    """Let a finished job's live keys expire after ``ttl`` seconds."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.expire(events_key(job_id), ttl)
        pipe.expire(snapshot_key(job_id), ttl)
        await pipe.execute()


# --------------------------------------------------------------------------
# Encoding stream entries for the wire, once per entry
# --------------------------------------------------------------------------


def wire_bytes(room: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> bytes:
    """The protocol message for one stream entry, as JSON bytes.

    The stored body is already JSON; splicing ``type``, ``roomId`` and ``id``
    in front of it avoids decoding and re-encoding every event per room.
    """
    kind = fields.get(b"t", b"event")
    body = fields[b"b"]
    eid = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
    msg_type = b"chat" if kind == b"chat" else b"event"
    # room ids are validated to [A-Za-z0-9_:-], so no escaping is needed.
    return b'{"type":"' + msg_type + b'","roomId":"' + room.encode() + b'","id":"' + eid + b'",' + body[1:]


def entry_dict(room: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One stream entry as a protocol message dict (for HTTP and SSE)."""
    msg = {"type": "chat" if fields.get(b"t") == b"chat" else "event", "roomId": room, "id": _s(entry_id)}
    msg.update(_body_dec.decode(fields[b"b"]))
    return msg


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
