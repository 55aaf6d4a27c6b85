"""Redis layout of a job: its event stream, snapshot and presence.

All keys of one job share the hash tag ``{job:<id>}`` so that they land on
one Redis Cluster slot and can be written in one MULTI. A stream entry has
two fields: ``t`` (``event`` or ``chat``) and ``b`` (the JSON body without
``id`` and ``roomId``). The entry id is the protocol's event id, so resume is
``XRANGE key (since +``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from progress_service.events import JobSnapshot, StoredChat, StoredEvent

_enc = msgspec.json.Encoder()
_snapshot_dec = msgspec.json.Decoder(JobSnapshot)
_body_dec = msgspec.json.Decoder(dict[str, Any])

Entry = tuple[bytes, dict[bytes, bytes]]


def room_id(job_id: str) -> str:
    """The room of a job."""
    return f"job:{job_id}"


def job_id_of(room: str) -> str:
    """The job of a room id (``job:<id>``)."""
    return room.split(":", 1)[1]


def events_key(job_id: str) -> str:
    return f"ps:{{job:{job_id}}}:events"


def snapshot_key(job_id: str) -> str:
    return f"ps:{{job:{job_id}}}:snap"


def presence_key(job_id: str) -> str:
    return f"ps:{{job:{job_id}}}:presence"


def cancel_key(job_id: str) -> str:
    return f"ps:{{job:{job_id}}}:cancel"


def ticket_key(ticket_hash: str) -> str:
    return f"ps:ticket:{ticket_hash}"


def encode_snapshot(snapshot: JobSnapshot) -> bytes:
    return _enc.encode(snapshot)


def decode_snapshot(raw: bytes) -> JobSnapshot:
    return _snapshot_dec.decode(raw)


async def append_event(
    redis: Redis,
    job_id: str,
    event: StoredEvent,
    *,
    maxlen: int,
    snapshot: JobSnapshot | None = None,
) -> str:
    """Append one job event (and the snapshot it leads to) atomically.

    Returns the new entry id. The snapshot and the stream change in one
    MULTI, so a reader that takes both in one MULTI never sees them disagree.
    """
    key = events_key(job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(key, {"t": b"event", "b": _enc.encode(event)}, maxlen=maxlen, approximate=True)
        # Count of entries ever added: with XLEN it tells whether the stream
        # was trimmed, which decides a `gap` on resume (Redis 6.2 has no
        # max-deleted-entry-id to ask).
        pipe.hincrby(snapshot_key(job_id), "n", 1)
        if snapshot is not None:
            pipe.hset(snapshot_key(job_id), "s", encode_snapshot(snapshot))
        res = await pipe.execute()
    return _s(res[0])


async def append_chat(redis: Redis, job_id: str, chat: StoredChat, *, maxlen: int) -> str:
    """Append a comment to the job's stream so every node and replay sees it in order."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(events_key(job_id), {"t": b"chat", "b": _enc.encode(chat)}, maxlen=maxlen, approximate=True)
        pipe.hincrby(snapshot_key(job_id), "n", 1)
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
    return await redis.xrange(events_key(job_id), min=start, max="+", count=count)


async def gap_oldest(redis: Redis, job_id: str, since: str) -> tuple[bool, str | None]:
    """Whether resuming after ``since`` misses trimmed events.

    Returns ``(gap, oldest retained id)``. A gap exists when the stream was
    trimmed and ``since`` is older than the oldest entry still retained.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xrange(events_key(job_id), count=1)
        pipe.xlen(events_key(job_id))
        pipe.hget(snapshot_key(job_id), "n")
        first, length, added = await pipe.execute()
    oldest = _s(first[0][0]) if first else None
    trimmed = int(added or 0) > int(length)
    if not trimmed:
        return False, oldest
    if oldest is None:
        return True, None
    # `since` equal to the last trimmed id would lose nothing, but that id is
    # unknown; anything older than the oldest retained entry counts as a gap.
    return id_lt(since, oldest), oldest


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
