"""Security events on /ws reach the audit log, without the credential."""

from __future__ import annotations

import anyio
import httpx
import msgspec

from gateway_helpers import auth, closed_with, connect, recv_type, send


async def audit_actions(base: str, admin: str, want: set[str], timeout: float = 10) -> list[dict]:
    """Poll GET /api/audit until every action in ``want`` is there (the writer is async)."""
    with anyio.fail_after(timeout):
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as client:
            while True:
                resp = await client.get("/api/audit", params={"limit": 200})
                assert resp.status_code == 200, resp.text
                items = resp.json()["items"]
                if want <= {i["action"] for i in items}:
                    return items
                await anyio.sleep(0.1)


async def test_refused_joins_and_abuse_closes_are_audited(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    admin = await make_token(role="admin", team="alpha")
    reviewer = await make_token(role="reviewer", team="alpha")
    async with live_server(settings, run_worker=False) as base:
        async with connect(base) as ws:
            await auth(ws, reviewer)
            await send(ws, type="join", roomId="job:doesnotexist")
            error = await recv_type(ws, "error")
            assert error["code"] == "not_found"
            await send(ws, type="join", roomId="job:x", extra=True)
            code, _ = await closed_with(ws)
            assert code == 1008
        items = await audit_actions(base, admin, {"join.refused", "ws.closed"})
        refused = next(i for i in items if i["action"] == "join.refused")
        assert refused["roomId"] == "job:doesnotexist"
        closed = next(i for i in items if i["action"] == "ws.closed")
        assert closed["detail"]["code"] == 1008


async def test_auth_failures_are_audited_without_the_token(make_settings, make_token, live_server, store_url) -> None:
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415

    settings = make_settings()
    secret = "ps_" + "s3cr3t" * 8
    async with live_server(settings, run_worker=False) as base:
        async with connect(base) as ws:
            await send(ws, type="auth", token=secret)
            code, reason = await closed_with(ws)
            assert (code, reason) == (4403, "auth failed")
        engine = create_engine(store_url)
        try:
            with anyio.fail_after(10):
                while True:
                    lines = [msgspec.json.encode(r).decode() async for r in audit.export(engine, since=0)]
                    if any('"auth.failed"' in line for line in lines):
                        break
                    await anyio.sleep(0.1)
        finally:
            await engine.dispose()
        assert not any("s3cr3t" in line for line in lines)
