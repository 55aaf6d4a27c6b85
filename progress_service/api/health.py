"""Liveness, readiness and Prometheus metrics for operators."""

from __future__ import annotations

import anyio
import msgspec
import sqlalchemy as sa
from litestar import MediaType, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from progress_service import metrics, outage
from progress_service.services import Services


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    checks: dict[str, str] = {}
    #: When unavailable: the API's error body fields too (``ErrorBody``).
    status_code: int | None = None
    detail: str | None = None


@get("/healthz", tags=["ops"], summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", tags=["ops"], summary="Redis and the SQL store answer")
async def readyz(services: Services) -> Response[Health]:
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(2):
            await services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        with anyio.fail_after(2):
            async with services.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    if ok:
        return Response(Health(status="ok", checks=checks))
    return Response(
        Health(
            status="unavailable",
            checks=checks,
            status_code=503,
            detail="not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
        ),
        status_code=503,
        headers={"Retry-After": str(outage.RETRY_AFTER_SECONDS)},
    )


@get("/metrics", tags=["ops"], media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics_endpoint() -> Response[bytes]:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
