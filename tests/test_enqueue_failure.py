"""A job whose enqueue fails is failed, not left ``queued``: POST /api/jobs answers 503.

Real redis-servers of the test's own are killed under a real app node; the
store (SQLite) stays up, so the job's row records what happened.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway_helpers import serve
from history_helpers import PrivateRedis
from progress_service.store.db import create_engine
from progress_service.store.jobs import get_job


def _job_id(detail: str) -> str:
    found = re.match(r"job ([0-9a-f]{32}) was not queued and is marked failed: ", detail)
    assert found, detail
    return found.group(1)


async def _row(store_url: str, job_id: str) -> Any:
    engine = create_engine(store_url)
    try:
        return await get_job(engine, job_id)
    finally:
        await engine.dispose()


async def test_queue_redis_down_fails_the_job(make_settings: Callable[..., Any], make_token, store_url, tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "queue") as queue_redis:
        settings = make_settings(queue_redis_url=queue_redis.url)
        token = await make_token(role="submitter")
        async with serve(settings) as (base, _app), httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            first = await http.post("/api/jobs", json={"prompt": "before"})
            assert first.status_code == 201, first.text  # the queue is the private Redis, and it works
            queue_redis.kill()
            refused = await http.post("/api/jobs", json={"prompt": "during"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"].isdigit()
            body = refused.json()
            assert body["status_code"] == 503 and "Redis is unavailable" in body["detail"]
            job_id = _job_id(body["detail"])
            # The events Redis is up: readers see the failure live, not a job queued forever.
            snap = (await http.get(f"/api/jobs/{job_id}")).json()
            assert snap["status"] == "failed" and snap["reason"].startswith("not queued at submit"), snap
            events = (await http.get(f"/api/jobs/{job_id}/events")).json()["items"]
            assert [e["data"]["status"] for e in events if e["kind"] == "status"] == ["queued", "failed"]
    row = await _row(store_url, job_id)
    assert row is not None and row.status == "failed" and row.finished_at


async def test_redis_down_at_submit_fails_the_job(make_settings: Callable[..., Any], make_token, store_url, tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "redis") as private:
        settings = make_settings(redis_url=private.url)
        token = await make_token(role="submitter")
        async with serve(settings) as (base, _app), httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            assert (await http.post("/api/jobs", json={"prompt": "before"})).status_code == 201
            private.kill()
            refused = await http.post("/api/jobs", json={"prompt": "during"})
            assert refused.status_code == 503, refused.text
            job_id = _job_id(refused.json()["detail"])
            row = await _row(store_url, job_id)
            assert row is not None and row.status == "failed", row
            private.start()  # the node shuts down cleanly with its Redis back
