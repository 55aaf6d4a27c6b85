"""Cookie sessions for the web page, CSRF, static caching and compression, offline API docs.

Against the real app on uvicorn with real Redis and SQLite.
"""

from __future__ import annotations

import httpx

from test_api import bearer


async def test_cookie_session_csrf_and_sign_out(make_settings, make_token, live_server) -> None:
    settings = make_settings()
    token = await make_token(role="submitter", user="sam")
    async with live_server(settings, run_worker=False) as base, httpx.AsyncClient(base_url=base) as client:
        refused = await client.post("/api/session", json={"token": "ps_nope"})
        assert refused.status_code == 401 and "refused" in refused.json()["detail"]
        assert (await client.get("/api/session")).json() == {"me": None, "csrf": None}

        signed = await client.post("/api/session", json={"token": token})
        assert signed.status_code == 201, signed.text
        cookie = signed.headers["set-cookie"]
        assert "ps_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
        assert token not in cookie
        body = signed.json()
        assert body["me"]["userName"] == "sam" and len(body["csrf"]) >= 20
        # Another tab: the cookie alone reads, and learns the CSRF secret.
        again = (await client.get("/api/session")).json()
        assert again["csrf"] == body["csrf"] and again["me"]["role"] == "submitter"
        assert (await client.get("/api/jobs")).status_code == 200

        # State-changing calls with the cookie need the header.
        no_csrf = await client.post("/api/jobs", json={"prompt": "x"})
        assert no_csrf.status_code == 403 and "X-CSRF-Token" in no_csrf.json()["detail"]
        wrong = await client.post("/api/ws-tickets", headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 403
        ticket = await client.post("/api/ws-tickets", headers={"X-CSRF-Token": body["csrf"]})
        assert ticket.status_code == 201 and ticket.json()["ticket"].startswith("pst_")
        job = await client.post("/api/jobs", json={"prompt": "x"}, headers={"X-CSRF-Token": body["csrf"]})
        assert job.status_code == 201

        # Tools keep using the bearer token, without CSRF.
        async with httpx.AsyncClient(base_url=base, headers=bearer(token)) as tool:
            assert (await tool.post("/api/ws-tickets")).status_code == 201

        assert (await client.delete("/api/session")).status_code == 403  # no CSRF header
        out = await client.delete("/api/session", headers={"X-CSRF-Token": body["csrf"]})
        assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]
        assert (await client.get("/api/jobs")).status_code == 401
        assert (await client.get("/api/session")).json() == {"me": None, "csrf": None}


async def test_static_assets_are_compressed_and_cached_and_docs_are_local(make_settings, live_server) -> None:
    async with live_server(make_settings(), run_worker=False) as base, httpx.AsyncClient(base_url=base) as client:
        for encoding in ("br", "gzip"):
            css = await client.get("/css/app.css", headers={"Accept-Encoding": encoding})
            assert css.status_code == 200 and css.headers["content-encoding"] == encoding
            assert "max-age=60" in css.headers["cache-control"] and css.headers.get("etag")
        vendor = await client.get("/vendor/marked-18.2.1.esm.js", headers={"Accept-Encoding": "br"})
        assert vendor.headers["content-encoding"] == "br" and "immutable" in vendor.headers["cache-control"]
        assert vendor.headers["content-type"].startswith("text/javascript")
        docs = await client.get("/schema")
        assert docs.status_code == 200 and "/vendor/rapidoc-9.3.8-min.js" in docs.text
        assert "unpkg" not in docs.text and "cdn" not in docs.text.lower()
        assert (await client.get("/schema/openapi.json")).json()["info"]["title"] == "progress-service"
