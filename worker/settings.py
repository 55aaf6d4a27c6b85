"""arq worker configuration: ``WorkerSettings`` for ``arq worker.settings.WorkerSettings``
and :func:`build_worker` for running a worker inside another program.

Both give the job function a context with ``settings``, ``engine`` (the SQL
store, migrated), ``redis`` (arq's pool) and ``worker_id``, and run the
lost-worker sweeper for as long as the worker runs (unless the host program
runs its own: the app does). :func:`build_worker` makes a
:class:`~worker.resilient.ResilientWorker`, which outlives Redis outages; the
plain ``arq`` command line runs arq's own ``Worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from arq import func
from arq.worker import Worker

from progress_service.queue import RUN_FUNCTION, arq_redis_settings
from progress_service.redis_client import make_redis, set_queue
from progress_service.settings import Settings, load_settings
from progress_service.store.db import create_engine
from progress_service.store.migrations import migrate
from worker.jobs import new_worker_id, run_job
from worker.recovery import run_sweeper
from worker.outage import Link, persist
from worker.proctree import become_subreaper
from worker.resilient import ResilientWorker

DEFAULT_REDIS_URL = "redis://localhost:6379"


def _arq_job_timeout(settings: Settings) -> float:
    # Above the longest job plus the SIGINT/SIGTERM/SIGKILL escalation, so
    # our own timeout (a clean "timed out" ending) always fires first.
    return settings.job_timeout_max + 3 * settings.cancel_grace + 60


def _function(settings: Settings) -> Any:
    # arq retries a job cancelled by a shutdown; those retries are refused by
    # the claim (run_job re-enqueues a new attempt itself), so a few tries
    # are enough to let arq give up on its own.
    return func(run_job, name=RUN_FUNCTION, max_tries=settings.job_max_tries + 2, timeout=_arq_job_timeout(settings))


async def on_startup(ctx: dict[str, Any]) -> None:
    """Fill the job context and start the sweeper."""
    settings: Settings = ctx.setdefault("settings", load_settings())
    if ctx.get("engine") is None:
        ctx["engine"] = create_engine(settings.database_url)
        ctx["own_engine"] = True
    # A store that is down at start is waited for, not a reason to exit.
    await persist(lambda: migrate(ctx["engine"]), Link("store (worker start)"))
    data_url = ctx.get("redis_url") or settings.redis_url or DEFAULT_REDIS_URL
    if ctx.get("queue_redis") is None and (settings.redis_cluster or settings.queue_url(data_url) != data_url):
        # The queue has a Redis of its own (PS_QUEUE_REDIS_URL; always with a
        # cluster): arq's pool (ctx["redis"]) stays the queue, job data go to
        # PS_REDIS_URL (a cluster client with PS_REDIS_CLUSTER).
        data = make_redis(data_url, cluster=settings.redis_cluster)
        set_queue(data, ctx["redis"])
        ctx["queue_redis"], ctx["redis"] = ctx["redis"], data
    ctx.setdefault("worker_id", new_worker_id())
    # Orphans of the CLIs this worker starts are re-parented to it (and killed with their job).
    become_subreaper()
    if ctx.get("run_sweeper", True):
        # Lives exactly as long as the worker: cancelled and awaited in on_shutdown.
        ctx["sweeper"] = asyncio.create_task(
            run_sweeper(ctx["redis"], ctx["engine"], settings, queue=ctx.get("queue_redis")), name="ps-sweeper"
        )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    """Stop the sweeper and release what on_startup created."""
    sweeper: asyncio.Task[None] | None = ctx.pop("sweeper", None)
    if sweeper is not None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
    queue_redis = ctx.pop("queue_redis", None)
    if queue_redis is not None:
        data, ctx["redis"] = ctx["redis"], queue_redis  # arq closes its own pool
        await data.aclose()
    if ctx.pop("own_engine", False):
        await ctx.pop("engine").dispose()


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` keyword arguments both entry points share."""
    return {
        "functions": [_function(settings)],
        "queue_name": settings.queue_name,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        # Cancels travel by the cancel flag only (see worker.jobs); arq's
        # abort would cancel the task natively and lose the CLI's last lines.
        "allow_abort_jobs": False,
        "max_jobs": settings.worker_concurrency,
        "job_timeout": _arq_job_timeout(settings),
        "poll_delay": 0.2,
        # A kept result also blocks a duplicate enqueue of the same _job_id.
        "keep_result": 3600,
    }


def worker_settings(settings: Settings) -> type:
    """A ``WorkerSettings`` class for arq's command line, configured from ``settings``."""
    options = worker_options(settings)
    namespace: dict[str, Any] = {
        "__doc__": "For ``arq worker.settings.WorkerSettings`` (settings from ``PS_*`` variables).",
        # The queue's Redis (PS_QUEUE_REDIS_URL, else PS_REDIS_URL); on_startup
        # then opens the data Redis beside it when they differ.
        "redis_settings": arq_redis_settings(settings.queue_url(settings.redis_url or DEFAULT_REDIS_URL)),
        "ctx": {"settings": settings},
        **options,
    }
    return type("WorkerSettings", (), namespace)


def __getattr__(name: str) -> Any:
    # ``arq worker.settings.WorkerSettings`` looks the class up by name: the
    # environment is read then, not whenever this module is imported.
    if name == "WorkerSettings":
        cls = worker_settings(load_settings())
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_worker(
    settings: Settings, *, redis_url: str, engine: Any = None, handle_signals: bool = False, sweeper: bool = True
) -> Worker:
    """An arq worker to run inside another program (``progress-service worker``/``dev``).

    Run it with ``await worker.async_run()`` and stop it with ``await
    worker.close()``: signals are the host program's business
    (``handle_signals=False``; pass True for a standalone ``worker.run()``,
    so SIGTERM drains jobs instead of killing the process outright).
    ``engine``, when given, is shared and not disposed by the worker.
    ``sweeper=False`` when the host program runs the lost-worker sweeper itself.
    """
    return ResilientWorker(
        redis_settings=arq_redis_settings(settings.queue_url(redis_url)),
        handle_signals=handle_signals,
        ctx={"settings": settings, "engine": engine, "run_sweeper": sweeper, "redis_url": redis_url},
        **worker_options(settings),
    )
