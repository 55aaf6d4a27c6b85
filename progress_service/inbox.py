"""A running job's inbox: instructions and permission answers from the room to its worker.

The one contract between the gateway (which authorizes, audits and enqueues)
and the worker running the job (which reads the inbox, writes to the CLI's
stdin and reports what became of each item). All keys share the job's hash
slot:

* ``ps:{job:<id>}:inbox``: a stream of :class:`InboxItem` (field ``b``),
  read by the worker of the running attempt;
* ``ps:{job:<id>}:steer``: a hash of outcomes. ``i:<requestId>`` holds an
  instruction's :class:`Outcome` (queued, then delivered with its event id,
  or rejected with a reason): the gateway adds it with the inbox entry in
  one script, so a retry with the same request id finds it and enqueues
  nothing (delivered once). ``p:<permissionId>`` holds a permission prompt's
  state (pending until the first answer or the timeout claims it, with
  :data:`CLAIM`); ``d:<requestId>`` the outcome of one ``decide``;
  ``closed`` is set by the worker once its CLI takes no more input.

Enqueueing refuses a job whose run state is not ``running`` and one whose
lease is gone (its worker died), in the same script, so an instruction is
never left in an inbox nobody reads: what got in before the worker closed
the inbox is rejected by it, what comes after is refused here.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from progress_service.keys import inbox_key, lease_key, run_key, steer_key

__all__ = [
    "CLAIM", "ENQUEUE", "InboxItem", "Outcome", "decode_outcome", "encode",
]

#: Most entries an inbox keeps (a busy room cannot grow it without bound).
INBOX_MAXLEN = 1000


class InboxItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One inbox entry: an instruction (``instruct``) or an answer (``decide``)."""

    kind: Literal["instruct", "decide"]
    requestId: str
    by: str
    text: str = ""
    permissionId: str | None = None
    allow: bool | None = None
    message: str | None = None


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What became of an instruction, a permission prompt or an answer."""

    state: str
    eventId: str | None = None
    reason: str | None = None
    by: str | None = None
    allow: bool | None = None
    text: str | None = None


_enc = msgspec.json.Encoder()
_outcome = msgspec.json.Decoder(Outcome)
_item = msgspec.json.Decoder(InboxItem)


def encode(value: msgspec.Struct) -> bytes:
    """The JSON form stored in the inbox and the outcome hash."""
    return _enc.encode(value)


def decode_outcome(raw: bytes | str | None) -> Outcome | None:
    """An outcome read from the hash (None when absent)."""
    return None if raw is None else _outcome.decode(raw)


def decode_item(raw: bytes | str) -> InboxItem:
    """An inbox entry's body."""
    return _item.decode(raw)


def keys(job_id: str) -> list[str]:
    """KEYS of :data:`ENQUEUE` and :data:`DECIDE`."""
    return [steer_key(job_id), inbox_key(job_id), run_key(job_id), lease_key(job_id)]


# KEYS: steer hash, inbox stream, run hash, lease.
# ARGV: outcome field, outcome json, item json, maxlen, ttl s.
# The field may hold this request's own reservation (state ``reserved``,
# taken before its audit record so a concurrent duplicate waits instead).
# -> {verdict, detail}: ok | dup (detail: the stored outcome) | closed |
#    not_running (detail: run state) | worker_gone
ENQUEUE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cjson.decode(cur)['state'] ~= 'reserved' then return {'dup', cur} end
local st = redis.call('HGET', KEYS[3], 'state')
if st ~= 'running' then return {'not_running', st or ''} end
if redis.call('HGET', KEYS[1], 'closed') then return {'closed', ''} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'worker_gone', ''} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'b', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'ok', ''}
"""

# KEYS: steer hash, inbox stream, run hash, lease.
# ARGV: prompt field, decided json, item json, maxlen, ttl s, answer field.
# -> ok | dup (detail: that answer's outcome) | unknown | decided (detail: the
#    prompt's state) | not_running | closed | worker_gone
DECIDE = """
local prev = redis.call('HGET', KEYS[1], ARGV[6])
if prev then return {'dup', prev} end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return {'unknown', ''} end
if cjson.decode(cur)['state'] ~= 'pending' then return {'decided', cur} end
local st = redis.call('HGET', KEYS[3], 'state')
if st ~= 'running' then return {'not_running', st or ''} end
if redis.call('HGET', KEYS[1], 'closed') then return {'closed', ''} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'worker_gone', ''} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[6], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'b', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {'ok', ARGV[2]}
"""

# Moves a pending prompt to its final state unless an answer got there first.
# KEYS: steer hash. ARGV: prompt field, new json. -> 1 claimed, 0 already decided
CLAIM = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cjson.decode(cur)['state'] ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def text_of(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
