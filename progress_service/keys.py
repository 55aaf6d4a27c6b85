"""Every Redis key and key pattern the service and its workers use.

One module so a reader (or an operator with ``redis-cli --scan``) sees the
whole layout at once; the strings are a deployed contract: changing one
orphans data in a running Redis.

The hash-tag rule: every key that belongs to one job carries the tag
``{job:<id>}`` (``ps:{job:<id>}:<part>``), so all of them hash to one Redis
Cluster slot. The Lua scripts and MULTI blocks that touch several of a job's
keys at once (claim, cancel, publish, comment, steer, hook ingest) rely on
it; a new per-job key must use :func:`_job` or a script touching it fails
with CROSSSLOT on a cluster. Keys not bound to one job (queue, tickets,
sessions, revocations) are single-key operations and carry no tag of a
job (a user's connection set and a rate-limit window have tags of their own).

Per-job keys (all expire with ``PS_EVENTS_TTL`` once the job ends)::

    ps:{job:<id>}:events        stream   the job's events and chats (entry id = event id)
    ps:{job:<id>}:snap          hash     s = JobSnapshot JSON, n = entry count, k = kept-flag
    ps:{job:<id>}:presence      zset     live connections of the room (score = expiry ms)
    ps:{job:<id>}:presence-idx  zset     the same entries, score 0: "is this user here?" by ZRANGEBYLEX
    ps:{job:<id>}:presence-log  stream   presence changes fanned out to the room
    ps:{job:<id>}:news          channel  (S)PUBLISHed by every write to events/presence-log (gateway/broker.py)
    ps:{job:<id>}:cancel        string   who asked to cancel
    ps:{job:<id>}:run           hash     run state (state, attempt, worker)
    ps:{job:<id>}:lease         string   the running attempt's lease (expires without refresh)
    ps:{job:<id>}:inbox         stream   steering items for the running CLI
    ps:{job:<id>}:steer         hash     steering outcomes (i:/p:/d: fields, closed)
    ps:{job:<id>}:chats         hash     comment row id -> stream entry id
    ps:{job:<id>}:hookstate     string   hook mapper state of a Claude Code session
    ps:{job:<id>}:hooklock      string   hook ingest lock
    ps:{job:<id>}:owner         string   team that reports a hook session

Global keys::

    ps:queue                        arq queue (default of PS_QUEUE_NAME)
    ps:ticket:<sha256>              string   one-use WebSocket ticket
    websession:<sha256>             string   browser session record
    ps:revocations                  stream   revoked token ids
    ps:hooksessions:<token>:<hour>  counter  hook sessions started per token and hour
    ps:audit:witness                stream   default audit witness stream
    ps:{user:<id>}:conns            zset     a user's live WebSockets over all nodes (node:conn -> expiry ms)
    ps:ratelimit:{<queue>:<who>}    hash     HTTP rate-limit window of a user or client address
"""

from __future__ import annotations

import hashlib

#: The default arq queue (``Settings.queue_name`` chooses the one in use).
QUEUE_NAME = "ps:queue"
#: The stream of revoked token ids every node watches.
REVOCATIONS_KEY = "ps:revocations"
#: The default Redis audit witness stream (``redis://...#stream`` overrides it).
AUDIT_WITNESS_STREAM = "ps:audit:witness"


def _job(job_id: str, part: str) -> str:
    """A per-job key: the ``{job:<id>}`` hash tag puts all of a job's keys on one slot."""
    return f"ps:{{job:{job_id}}}:{part}"


def events_key(job_id: str) -> str:
    """The job's event stream (events and chats; the entry id is the event id)."""
    return _job(job_id, "events")


def snapshot_key(job_id: str) -> str:
    """The job's snapshot hash (``s`` snapshot, ``n`` entries, ``k`` kept)."""
    return _job(job_id, "snap")


def presence_key(job_id: str) -> str:
    """The sorted set of live connections in the job's room."""
    return _job(job_id, "presence")


def presence_index_key(job_id: str) -> str:
    """The room's lex index: the presence entries at score 0, for "is this user here?" (ZRANGEBYLEX).

    The presence scripts derive it from the presence key (``KEYS[1] .. '-idx'``),
    so it shares the job's slot.
    """
    return presence_key(job_id) + "-idx"


def presence_stream_key(job_id: str) -> str:
    """The stream of presence changes of a job's room (not the job's event log)."""
    return _job(job_id, "presence-log")


def presence_nodes_key() -> str:
    """Gateway nodes with presence entries: node id -> heartbeat expiry (epoch ms)."""
    return "ps:presence:nodes"


def presence_node_rooms_key(node_id: str) -> str:
    """The rooms in which a gateway node has presence entries (cleared when it is found dead)."""
    return f"ps:presence:node:{node_id}:rooms"


def presence_cleanup_key(node_id: str) -> str:
    """Held by the node that clears a dead node's presence entries."""
    return f"ps:presence:cleanup:{node_id}"


def cancel_key(job_id: str) -> str:
    """The cancel flag (value: who cancelled)."""
    return _job(job_id, "cancel")


def run_key(job_id: str) -> str:
    """The job's run-state hash (state, attempt, worker)."""
    return _job(job_id, "run")


def lease_key(job_id: str) -> str:
    """The running attempt's lease; it expires when its worker stops refreshing it."""
    return _job(job_id, "lease")


def inbox_key(job_id: str) -> str:
    """The steering stream the worker of the running attempt reads."""
    return _job(job_id, "inbox")


def steer_key(job_id: str) -> str:
    """The steering outcomes hash (see :mod:`progress_service.inbox`)."""
    return _job(job_id, "steer")


def published_key(job_id: str) -> str:
    """Comment row id -> stream entry id of the job's comments."""
    return _job(job_id, "chats")


def hook_state_key(job_id: str) -> str:
    """The hook mapper's memory of a session (pending tools, to-dos, recent keys)."""
    return _job(job_id, "hookstate")


def hook_lock_key(job_id: str) -> str:
    """The lock one hook ingest holds while it maps and publishes a batch."""
    return _job(job_id, "hooklock")


def hook_owner_key(job_id: str) -> str:
    """The team that reports a hook session (claimed by its first hook)."""
    return _job(job_id, "owner")


def ticket_key(ticket_hash: str) -> str:
    """A one-use WebSocket ticket, by the ticket's hash."""
    return f"ps:ticket:{ticket_hash}"


def web_session_key(session_id: str) -> str:
    """A browser session, by the id's hash (a Redis dump holds no cookie)."""
    return "websession:" + hashlib.sha256(session_id.encode()).hexdigest()


def news_channel(job_id: str) -> str:
    """The sharded pub/sub channel every write to the job's streams touches (gateway/broker.py).

    The Lua scripts derive it from the stream key (``streams.NOTIFY_LUA``):
    it keeps the job's hash tag, so it lives on the job's shard.
    """
    return _job(job_id, "news")


def hook_sessions_key(token_id: str, hour: int) -> str:
    """Hook sessions a token started in one epoch hour (``PS_HOOK_MAX_SESSIONS_PER_HOUR``)."""
    return f"ps:hooksessions:{token_id}:{hour}"


def hook_rate_key(token_id: str) -> str:
    """A reporter token's hook rate bucket over all nodes (``PS_HOOK_RATE``/``PS_HOOK_BURST``)."""
    return f"ps:hookrate:{token_id}"


def connections_key(user_id: str) -> str:
    """The user's live WebSocket connections over all nodes: ``node:conn`` -> expiry (Redis ms)."""
    return f"ps:{{user:{user_id}}}:conns"


def rate_limit_key(namespace: str, identifier: str) -> str:
    """The HTTP rate-limit window of one caller (``user:<id>`` or ``addr:<ip>``).

    ``namespace`` is the deployment's queue name (one per deployment), so two
    deployments sharing a Redis keep separate counts.
    """
    return f"ps:ratelimit:{{{namespace}:{identifier}}}"
