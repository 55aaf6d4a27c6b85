"""Hostile HTTP input against a real server: every case is a precise 4xx, never a 500 or a hang.

Regression cases found by schemathesis and by hand (issue 2: "bad input gets
a 4xx whose body says which field and why").
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from gateway_helpers import Store, serve


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """The store on SQLite and on PostgreSQL (which refuses NUL in text)."""
    async with Store(db_url) as s:
        yield s


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_hostile_requests_get_precise_4xx(
    make_settings: Callable[..., Any], store: Store, db_url: str
) -> None:
    token = await store.token(role="admin", team="t1")
    job = await store.job(team="t1")
    big = 99999999999999999999
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        # (method, path, request kwargs, status, text expected in the body)
        ("GET", f"/api/jobs?cursor={_b64(f'{big}:abc'.encode())}", {}, 400, "cursor"),
        ("GET", f"/api/jobs?cursor={_b64(b'-5:abc')}", {}, 400, "cursor"),
        ("GET", "/api/jobs?limit=-1", {}, 400, "limit"),
        ("GET", "/api/audit?order=sideways&secret=s3cr3t", {}, 400, "order"),
        ("GET", f"/api/jobs?limit={big}", {}, 400, "limit"),
        ("GET", "/api/audit?cursor=9999999999999999999", {}, 400, "cursor"),
        ("GET", f"/api/audit?since={big}999", {}, 400, "since"),
        ("GET", "/api/audit?since=" + "9" * 38 + "d", {}, 400, "since"),
        (
            "GET",
            f"/api/jobs/{job}/comments?cursor=9999999999999999999",
            {},
            400,
            "cursor",
        ),
        ("GET", f"/api/jobs/{job}/events?since={big}-{big}", {}, 400, "since"),
        (
            "GET",
            f"/api/jobs/{job}/events?since=18446744073709551616-0",
            {},
            400,
            "since",
        ),
        (
            "GET",
            f"/api/jobs/{job}/stream",
            {"headers": {"Last-Event-ID": f"{big}-0"}},
            400,
            "Last-Event-ID",
        ),
        (
            "GET",
            f"/api/jobs/{job}/stream",
            {"headers": {"Last-Event-ID": "bogus"}},
            400,
            "Last-Event-ID",
        ),
        ("GET", "/api/jobs/%E2%98%83", {}, 404, "no such job"),
        ("GET", "/api/audit?action=a%00b", {}, 400, "action"),
        ("GET", "/api/audit?room=job:a%00b", {}, 400, "room"),
        ("DELETE", "/api/tokens/a%00b", {}, 404, "no such token"),
        ("DELETE", "/api/tokens/not-a-uuid", {}, 404, "no such token"),
        ("GET", "/api/jobs?status=queued%00", {}, 400, "status"),
        ("GET", "/api/jobs/..%2F..%2Fetc", {}, 404, ""),
        ("POST", "/api/jobs", {"content": b'{"prompt":"\xff\xfe"}'}, 400, "UTF-8"),
        (
            "POST",
            "/api/jobs",
            {"content": b"[" * 100_000 + b"]" * 100_000},
            400,
            "nested",
        ),
        (
            "POST",
            "/api/jobs",
            {"content": b'{"prompt":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001},
            400,
            "nested",
        ),
        (
            "POST",
            "/api/jobs",
            {"content": b'{"prompt":"' + b"a" * (3 << 20) + b'"}'},
            413,
            "larger than",
        ),
        ("POST", "/api/jobs", {"json": {"prompt": "x\u0000y"}}, 400, "NUL"),
        (
            "POST",
            "/api/jobs",
            {"json": {"prompt": "x", "workdir": "../.."}},
            400,
            "workdir",
        ),
        (
            "POST",
            "/api/jobs",
            {"json": {"prompt": "x", "maxTurns": big}},
            400,
            "maxTurns",
        ),
        (
            "POST",
            "/api/jobs",
            {"json": {"prompt": "x", "workdir": "0" * 1000}},
            400,
            "workdir",
        ),  # ENAMETOOLONG
        ("POST", "/api/jobs", {"json": [1]}, 400, "object"),
        (
            "POST",
            f"/api/jobs/{job}/comments",
            {"json": {"text": "hi"}, "headers": {"Idempotency-Key": "k" * 101}},
            400,
            "idempotency_key",
        ),
        (
            "POST",
            f"/api/jobs/{job}/comments",
            {"json": {"text": "hi"}, "headers": {"Idempotency-Key": "a\x01b"}},
            400,
            "Invalid HTTP request",  # uvicorn refuses it before the app
        ),
        (
            "POST",
            f"/api/jobs/{job}/comments",
            {"json": {"text": "a\u0000b"}, "headers": {"Idempotency-Key": "k1"}},
            400,
            "control characters",
        ),
    ]
    async with serve(make_settings(database_url=db_url)) as (base, _app):
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as client:
            failures = []
            for method, path, kw, status, text in cases:
                if "content" in kw:
                    kw = {
                        **kw,
                        "headers": {
                            "Content-Type": "application/json",
                            **kw.get("headers", {}),
                        },
                    }
                resp = await client.request(method, path, **kw)
                if (
                    resp.status_code != status
                    or text not in resp.text
                    or "s3cr3t" in resp.text
                ):
                    failures.append(
                        (method, path[:80], resp.status_code, resp.text[:200])
                    )
            assert failures == []
            # Idempotency-Key reuse: the same text is a retry (200), another text a conflict (409).
            path = f"/api/jobs/{job}/comments"
            first = await client.post(
                path, json={"text": "once"}, headers={"Idempotency-Key": "dup"}
            )
            again = await client.post(
                path, json={"text": " once "}, headers={"Idempotency-Key": "dup"}
            )
            other = await client.post(
                path, json={"text": "twice"}, headers={"Idempotency-Key": "dup"}
            )
            assert (first.status_code, again.status_code, other.status_code) == (
                201,
                200,
                409,
            )
            assert (
                again.json()["id"] == first.json()["id"]
                and "Idempotency-Key" in other.json()["detail"]
            )
            # The server is still healthy after all that.
            assert (await client.get("/api/me")).status_code == 200


async def test_sse_streams_per_user_are_capped(
    make_settings: Callable[..., Any], store_url: str
) -> None:
    """Each SSE stream holds a hub member and a buffer: one user cannot open them without bound."""
    async with Store(store_url) as s:
        token = await s.token(role="viewer", team="t1")
        job = await s.job(team="t1")
    settings = make_settings(ws_max_connections_per_user=2)
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        serve(settings) as (base, _app),
        httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client,
    ):
        path = f"/api/jobs/{job}/stream"
        async with (
            client.stream("GET", path) as first,
            client.stream("GET", path) as second,
        ):
            readers = []  # kept: an abandoned line iterator closes its connection
            for resp in (first, second):
                assert resp.status_code == 200
                readers.append(resp.aiter_lines())
                assert (await anext(readers[-1])).startswith("event: joined")
            third = await client.get(path, timeout=3)
            assert (
                third.status_code == 429
                and "too many open connections and streams" in third.json()["detail"]
            )
        # Closing them frees the slots.
        with anyio.fail_after(5):
            while True:
                async with client.stream("GET", path) as again:
                    if again.status_code == 200:
                        break
                await anyio.sleep(0.05)
