"""``PS_QUEUE_REDIS_URL``: the queue on a Redis of its own; required with ``PS_REDIS_CLUSTER``.

Real processes: ``serve`` refusing to start, and an app node with its
in-process worker whose queue is a private redis-server while events go
to the shared Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from history_helpers import PrivateRedis, wait_status
from progress_service.settings import load_settings
from servers import run_app

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_without_queue_url_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^PS_QUEUE_REDIS_URL: required with PS_REDIS_CLUSTER=true"):
        load_settings(env={"PS_REDIS_CLUSTER": "true", "PS_REDIS_URL": "redis://127.0.0.1:7000/0"})
    ok = load_settings(env={"PS_REDIS_CLUSTER": "true", "PS_QUEUE_REDIS_URL": "redis://q:6379/0"})
    assert ok.queue_url("redis://127.0.0.1:7000/0") == "redis://q:6379/0"
    assert load_settings(env={}).queue_url("redis://data:6379/0") == "redis://data:6379/0"


def test_serve_says_so_at_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(PS_REDIS_CLUSTER="true", PS_REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run(
        [sys.executable, "-m", "progress_service.cli", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "PS_QUEUE_REDIS_URL: required with PS_REDIS_CLUSTER=true" in result.stderr


async def test_jobs_run_through_a_queue_redis_of_their_own(
    make_settings: Callable[..., Any], make_token: Callable[..., Any], redis: Any, tmp_path: Path
) -> None:
    with PrivateRedis(tmp_path / "queue") as queue_redis:
        settings = make_settings(queue_redis_url=queue_redis.url)
        token = await make_token(role="submitter")
        async with run_app(settings, run_worker=True) as (base, _app), httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            job = (await http.post("/api/jobs", json={"prompt": "hello"})).json()
            done = await wait_status(http, job["id"], ("succeeded", "failed", "cancelled"), timeout=60)
            assert done["status"] == "succeeded", done
            queue = Redis.from_url(queue_redis.url)
            try:
                # arq's records of the run are on the queue's Redis, not on the events' one.
                with anyio.fail_after(15):  # arq stores it once the run's function returned
                    while not await queue.exists(f"arq:result:{job['id']}"):
                        await anyio.sleep(0.05)
                assert await redis.exists(f"arq:result:{job['id']}") == 0
            finally:
                await queue.aclose()
            assert (await http.get(f"/api/jobs/{job['id']}/events")).json()["items"][-1]["data"]["status"] == "succeeded"
