"""The job queue and run-state contract between the HTTP API and the worker.

The API enqueues and cancels; the worker claims, keeps a lease on and
finishes runs. Who may run or cancel a job is decided in Redis by small Lua
scripts on the job's run-state hash ``ps:{job:<id>}:run`` (fields ``state``:
queued | running | done | cancelled, ``attempt``, ``worker``), so a worker
and a canceller can never both win, and a superseded attempt (arq's own retry
of a job the sweeper already re-enqueued) is refused. Every key carries the
job's hash tag, so the scripts also run on Redis Cluster.

A missing run hash means "queued, attempt 1": enqueueing writes nothing but
the arq job.
"""

from __future__ import annotations

import enum
from typing import Literal

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from progress_service.keys import QUEUE_NAME, cancel_key, lease_key, run_key
from progress_service.redis_client import queue_of

#: The arq function name of a job run.
RUN_FUNCTION = "run_job"

RunState = Literal["queued", "running", "done", "cancelled"]


class ClaimVerdict(enum.StrEnum):
    """What :func:`claim_run` decided about an attempt (only ``OK`` may run)."""

    OK = "ok"
    TERMINAL = "terminal"
    BUSY = "busy"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"


class HandBackVerdict(enum.StrEnum):
    """What :func:`hand_back_run` did with a stopping worker's attempt."""

    OK = "ok"
    CANCELLED = "cancelled"
    LOST = "lost"


class ReapVerdict(enum.StrEnum):
    """What :func:`reap_run` decided about a job whose row says running."""

    ALIVE = "alive"
    ENDED = "ended"
    STALE = "stale"
    REQUEUE = "requeue"
    FAILED = "failed"
    CANCELLED = "cancelled"


def arq_job_id(job_id: str, attempt: int) -> str:
    """The arq job id of one attempt: unique per attempt so a retry is not a duplicate."""
    return job_id if attempt <= 1 else f"{job_id}:{attempt}"


def arq_redis_settings(redis_url: str) -> RedisSettings:
    """arq connection settings for ``redis_url``, with connection retries.

    arq's defaults give up quickly on a Redis that is still starting; a
    worker supervised next to Redis (compose, dev) should wait for it.
    """
    rs = RedisSettings.from_dsn(redis_url)
    rs.conn_retries = 10
    rs.conn_retry_delay = 1
    rs.conn_timeout = 5
    rs.retry_on_timeout = True
    # A dropped connection mid-command is retried instead of killing the
    # worker loop (arq's main loop dies on an unhandled ConnectionError).
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    rs.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), 8)
    return rs


async def enqueue_job(arq_pool: ArqRedis, job_id: str, *, attempt: int = 1, queue_name: str = QUEUE_NAME) -> None:
    """Put one attempt of a job on the queue.

    The arq ``_job_id`` is derived from the job id and attempt, so submitting
    the same attempt twice enqueues it once (arq refuses a duplicate while
    the job or its kept result exists).
    """
    arq_pool = queue_of(arq_pool)  # on a cluster: the queue's own Redis
    await arq_pool.enqueue_job(
        RUN_FUNCTION,
        job_id,
        attempt,
        _job_id=arq_job_id(job_id, attempt),
        _queue_name=queue_name,
    )


# --------------------------------------------------------------------------
# Run-state scripts (KEYS share the {job:<id>} hash tag)
# --------------------------------------------------------------------------

# KEYS: run, lease, cancel. ARGV: attempt, worker id, lease ms, ttl s.
# -> {verdict, current attempt}; verdict ok | terminal | busy | superseded | cancelled
# A set cancel flag wins over a queued attempt (a cancel that raced a
# re-enqueue): the run becomes cancelled and the claimer publishes it.
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'state')
local att = tonumber(redis.call('HGET', KEYS[1], 'attempt') or ARGV[1])
local a = tonumber(ARGV[1])
if st == 'done' or st == 'cancelled' then return {'terminal', att} end
if st == 'running' then return {'busy', att} end
if st and a ~= att then return {'superseded', att} end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'attempt', att)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'cancelled', att}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'attempt', a, 'worker', ARGV[2])
redis.call('PERSIST', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {'ok', a}
"""

# KEYS: run, lease. ARGV: attempt, worker id, lease ms.
# -> 1 still ours, 2 re-created (the run hash had vanished: Redis restarted
# empty), 0 lost it
_REFRESH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'running', 'attempt', ARGV[1], 'worker', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 2
end
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1])
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: run, lease. ARGV: attempt, worker id, final state, ttl s. -> 1 ours, 0 not
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1])
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: run, cancel. ARGV: who, ttl s.
# -> {verdict, attempt}; verdict cancelled (never started) | running | terminal
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'state')
local att = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1')
if st == 'done' or st == 'cancelled' then return {'terminal', att} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
if st == 'running' then return {'running', att} end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'attempt', att)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'cancelled', att}
"""

# KEYS: run, lease, cancel. ARGV: attempt (the job row's), max tries.
# -> {verdict, tries spent}; verdict alive | ended | stale | requeue | failed | cancelled
# Tries spent are attempts minus hand-backs ('free'): a worker that stopped
# gracefully handed its attempt back and that costs no try.
_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'alive', 0} end
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'done' or st == 'cancelled' then return {'ended', 0} end
if st == 'queued' then return {'stale', 0} end
if st and tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1]) then return {'stale', 0} end
local spent = tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'free') or '0')
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'attempt', ARGV[1])
  return {'cancelled', spent}
end
if spent < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', tonumber(ARGV[1]) + 1)
  redis.call('HDEL', KEYS[1], 'worker')
  return {'requeue', spent}
end
redis.call('HSET', KEYS[1], 'state', 'done', 'attempt', ARGV[1])
return {'failed', spent}
"""

# KEYS: run, lease, cancel. ARGV: attempt, worker id.
# -> ok (queued as the next attempt, no try spent) | cancelled (the flag is
# set: the worker ends the job as cancelled instead) | lost (not ours)
_HAND_BACK = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or tonumber(redis.call('HGET', KEYS[1], 'attempt')) ~= tonumber(ARGV[1])
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 'lost'
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'cancelled' end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', tonumber(ARGV[1]) + 1)
redis.call('HINCRBY', KEYS[1], 'free', 1)
redis.call('HDEL', KEYS[1], 'worker')
redis.call('DEL', KEYS[2])
return 'ok'
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def claim_run(
    redis: Redis, job_id: str, attempt: int, worker_id: str, lease_s: float, ttl: int = 7 * 24 * 3600
) -> tuple[ClaimVerdict, int]:
    """Atomically take attempt ``attempt`` of a job for ``worker_id``.

    Returns ``(verdict, current attempt)``; only verdict ``ok`` may run.
    ``terminal`` (done or cancelled), ``busy`` (another worker runs it) and
    ``superseded`` (a newer attempt was enqueued) must not; ``cancelled``
    means a cancel arrived while it was queued and the caller publishes the
    cancellation (:func:`progress_service.lifecycle.publish_cancelled`).
    """
    verdict, att = await redis.eval(
        _CLAIM, 3, run_key(job_id), lease_key(job_id), cancel_key(job_id), attempt, worker_id, int(lease_s * 1000), ttl
    )
    return ClaimVerdict(_s(verdict)), int(att)


async def refresh_lease(redis: Redis, job_id: str, attempt: int, worker_id: str, lease_s: float) -> int:
    """Extend the lease: 1 still ours, 2 re-created after Redis lost it, 0 this worker lost the run.

    Re-creating a vanished run hash keeps a live worker from being declared
    lost when Redis restarted empty: the sweeper waits ``PS_LEASE_GRACE``
    seconds before it believes a missing lease.
    """
    res = await redis.eval(
        _REFRESH, 2, run_key(job_id), lease_key(job_id), attempt, worker_id, int(lease_s * 1000)
    )
    return int(res)


async def hand_back_run(redis: Redis, job_id: str, attempt: int, worker_id: str) -> HandBackVerdict:
    """A stopping worker gives its attempt back: ``ok``, ``cancelled`` or ``lost`` (see ``_HAND_BACK``)."""
    raw = await redis.eval(_HAND_BACK, 3, run_key(job_id), lease_key(job_id), cancel_key(job_id), attempt, worker_id)
    return HandBackVerdict(_s(raw))


async def finish_run(
    redis: Redis, job_id: str, attempt: int, worker_id: str, state: RunState, ttl: int
) -> bool:
    """Mark the run ended and drop its lease; False when it was not ours any more."""
    res = await redis.eval(_FINISH, 2, run_key(job_id), lease_key(job_id), attempt, worker_id, state, ttl)
    return bool(res)


async def reap_run(redis: Redis, job_id: str, attempt: int, max_tries: int) -> tuple[ReapVerdict, int]:
    """Decide the fate of a job whose row says running: ``(verdict, tries spent)`` (see ``_REAP``)."""
    verdict, spent = await redis.eval(
        _REAP, 3, run_key(job_id), lease_key(job_id), cancel_key(job_id), attempt, max_tries
    )
    return ReapVerdict(_s(verdict)), int(spent)


async def cancel_requested(redis: Redis, job_id: str) -> str | None:
    """Who asked to cancel the job, or None."""
    raw = await redis.get(cancel_key(job_id))
    return _s(raw) if raw is not None else None


class CancelVerdict(enum.StrEnum):
    """What :func:`request_cancel` found: never started (now cancelled), running (its worker stops it), ended."""

    CANCELLED = "cancelled"
    RUNNING = "running"
    TERMINAL = "terminal"


async def request_cancel(redis: Redis, job_id: str, who: str, ttl: int) -> tuple[CancelVerdict, int]:
    """Set the job's cancel flag and decide its run state in one step: ``(verdict, attempt)``.

    ``cancelled``: it never started and now never will (the caller publishes
    that); ``running``: its worker stops it; ``terminal``: it had ended.
    """
    verdict, attempt = await redis.eval(_CANCEL, 2, run_key(job_id), cancel_key(job_id), who, str(ttl))
    return CancelVerdict(_s(verdict)), int(attempt)


async def run_state(redis: Redis, job_id: str) -> str | None:
    """The run hash's state (queued | running | done | cancelled), None when absent."""
    raw = await redis.hget(run_key(job_id), "state")
    return _s(raw) if raw is not None else None


# KEYS: run. ARGV: ttl s. -> 'given_up', or the state a worker already set
# (its enqueue went through after all: the reply was lost, not the command).
_GIVE_UP = """
local st = redis.call('HGET', KEYS[1], 'state')
if st and st ~= 'queued' then return st end
redis.call('HSET', KEYS[1], 'state', 'done', 'attempt', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'given_up'
"""


async def give_up_unqueued(redis: Redis, job_id: str, ttl: int) -> bool:
    """Close the run of a job whose enqueue failed (a late arq job is then refused at its claim).

    False when a worker already set the run's state: the enqueue went
    through after all (its reply was lost), so there is nothing to give up.
    A Redis that cannot be asked counts as given up: no worker can claim
    the job there either, and the row decides.
    """
    try:
        verdict = _s(await redis.eval(_GIVE_UP, 1, run_key(job_id), ttl))
    except (RedisError, OSError):
        return True
    return verdict == "given_up"
