"""Hostile WebSocket clients against a real server: each ends with the protocol's
close code, and a normal client in the same room keeps receiving every event.

Covers malformed JSON, wrong types, out-of-range values, binary and oversized
frames, invalid UTF-8, fragmentation, protocol errors, TCP resets mid-frame,
floods and ticket replay; the server log must hold no traceback of ours and
no secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from gateway_helpers import (
    Store,
    auth,
    closed_with,
    collect_events,
    connect,
    join,
    publish,
    send,
    serve,
)

FAST = {"ws_auth_timeout": 0.5, "presence_grace": 0.3}
ROOM_RE_HINT = "$.roomId"


# --------------------------------------------------------------------------
# A raw client, for what the websockets library refuses to send
# --------------------------------------------------------------------------


def _frame(op: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([(0x80 if fin else 0) | op, 0x80 | n])
    elif n < 65536:
        head = bytes([(0x80 if fin else 0) | op, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([(0x80 if fin else 0) | op, 0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Raw:
    """A hand-rolled WebSocket client speaking bytes on a TCP stream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str, token: str) -> Raw:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        with anyio.fail_after(5):
            assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        raw = cls(reader, writer)
        await raw.send(_frame(1, json.dumps({"type": "auth", "token": token}).encode()))
        op, payload = await raw.read_frame()
        assert op == 1 and b"auth_ok" in payload, payload
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        with anyio.fail_after(5):
            head = await self.reader.readexactly(2)
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return head[0] & 0x0F, await self.reader.readexactly(n)

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            op, payload = await self.read_frame()
            if op == 8:
                self.writer.close()
                return struct.unpack("!H", payload[:2])[0]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def _hostile_cases(room: str) -> list[tuple[str, bool, Any, int, str]]:
    """(name, join first, frame, close code, text the reason must contain)."""
    return [
        ("truncated JSON", False, '{"type":"auth"', 1008, "invalid JSON"),
        ("array", False, "[1,2]", 1008, "object"),
        ("deep nesting", False, '{"a":' * 1500 + "1" + "}" * 1500, 1009, ""),
        (
            "huge number",
            False,
            json.dumps({"type": "join", "roomId": room})[:-1] + ',"since":1e999999}',
            1008,
            "$.since",
        ),
        (
            "since over 64 bits",
            False,
            json.dumps(
                {"type": "join", "roomId": room, "since": "99999999999999999999-0"}
            ),
            1008,
            "$.since",
        ),
        (
            "since wrong type",
            False,
            json.dumps({"type": "join", "roomId": room, "since": 5}),
            1008,
            "$.since",
        ),
        (
            "roomId wrong type",
            False,
            json.dumps({"type": "join", "roomId": 5}),
            1008,
            ROOM_RE_HINT,
        ),
        (
            "roomId traversal",
            False,
            json.dumps({"type": "join", "roomId": "job:../../x"}),
            1008,
            ROOM_RE_HINT,
        ),
        (
            "roomId unicode",
            False,
            json.dumps({"type": "join", "roomId": "job:\u2603"}),
            1008,
            ROOM_RE_HINT,
        ),
        ("unknown field", False, '{"type":"ping","zzz":1}', 1008, "zzz"),
        ("unknown type", False, '{"type":"zzz"}', 1008, "$.type"),
        ("no type", False, "{}", 1008, "type"),
        ("binary frame", False, b"\x00\x01", 1003, "text frames only"),
        (
            "oversized frame",
            False,
            '{"type":"ping","x":"' + "a" * 9000 + '"}',
            1009,
            "message too large",
        ),
        ("giant frame", False, "x" * 200_000, 1009, ""),
        (
            "chat before join",
            False,
            json.dumps(
                {"type": "chat", "roomId": room, "requestId": "r", "text": "hi"}
            ),
            1008,
            "join",
        ),
        (
            "chat control chars",
            True,
            json.dumps(
                {"type": "chat", "roomId": room, "requestId": "r", "text": "a\u0007b"}
            ),
            1008,
            "control",
        ),
        (
            "chat NUL requestId",
            True,
            json.dumps(
                {"type": "chat", "roomId": room, "requestId": "\u0000", "text": "hi"}
            ),
            1008,
            "$.requestId",
        ),
        (
            "chat lone surrogate",
            True,
            '{"type":"chat","roomId":"' + room + '","requestId":"r","text":"a\\ud800"}',
            1008,
            "",
        ),
        ("bad re-auth", False, '{"type":"auth","token":"nope"}', 4403, "auth failed"),
        (
            "auth token wrong type",
            False,
            '{"type":"auth","token":123}',
            1008,
            "$.token",
        ),
    ]


async def test_hostile_messages_close_precisely_and_neighbours_keep_receiving(
    make_settings: Callable[..., Any],
    store: Store,
    redis: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    token = await store.token(role="admin", team="t1")
    job = await store.job(team="t1")
    room = f"job:{job}"
    async with (
        serve(make_settings(**FAST)) as (base, _app),
        connect(base, max_queue=None) as neighbour,
    ):
        await auth(neighbour, token)
        await join(neighbour, job)
        sent = await publish(redis, job, 3)
        failures = []
        for name, join_first, frame, code, text in _hostile_cases(room):
            async with connect(base) as ws:
                await auth(ws, token)
                if join_first:
                    await join(ws, job)
                await ws.send(frame)
                got_code, reason = await closed_with(ws)
                if got_code != code or text not in (reason or ""):
                    failures.append((name, got_code, reason))
        # Malformed at the WebSocket layer: a raw client.
        raw = await Raw.open(base, token)
        await raw.send(_frame(1, b'{"type":"ping","x":"\xff\xfe"}'))
        if (c := await raw.close_code()) != 1007:
            failures.append(("invalid UTF-8", c, ""))
        raw = await Raw.open(base, token)
        await raw.send(_frame(1, b'{"type":', fin=False) + _frame(0, b'"ping"}'))
        op, payload = await raw.read_frame()
        if b'"pong"' not in payload:
            failures.append(("fragmented ping", op, payload))
        raw.writer.close()
        raw = await Raw.open(base, token)
        chunk = b"a" * 6000
        await raw.send(
            _frame(1, b'{"type":"ping","a":"' + chunk, fin=False)
            + _frame(0, chunk, fin=False)
            + _frame(0, chunk + b'"}')
        )
        if (c := await raw.close_code()) != 1009:
            failures.append(("fragmented oversize", c, ""))
        for name, data in [
            ("bare continuation", _frame(0, b"xx")),
            ("reserved opcode", _frame(0xB, b"")),
            ("RSV1 without deflate", bytes([0xC1, 0x85]) + os.urandom(9)),
            ("control frame over 125 bytes", _frame(9, b"p" * 200)),
        ]:
            raw = await Raw.open(base, token)
            await raw.send(data)
            if (c := await raw.close_code()) != 1002:
                failures.append((name, c, ""))
        # TCP resets in the middle of a frame.
        for cut in (
            _frame(1, b"x" * 100_000)[:5000],
            _frame(1, b'{"type":"ping"}')[:10],
        ):
            raw = await Raw.open(base, token)
            await raw.send(cut)
            raw.writer.transport.abort()
        assert failures == []
        # The neighbour got everything, in order, before and after all that.
        sent += await publish(redis, job, 3, start=3)
        got = [e["id"] for e in await collect_events(neighbour, 6)]
        assert got == sent
        await send(neighbour, type="ping")
    assert token not in caplog.text
    ours = [
        r
        for r in caplog.records
        if r.exc_info and r.name.startswith("progress_service")
    ]
    assert ours == []


async def test_floods_and_replay_end_with_the_protocol_codes(
    make_settings: Callable[..., Any],
    store: Store,
    redis: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    token = await store.token(role="admin", team="t1")
    job = await store.job(team="t1")
    room = f"job:{job}"
    async with (
        serve(make_settings(**FAST)) as (base, _app),
        connect(base, max_queue=None) as neighbour,
    ):
        await auth(neighbour, token)
        await join(neighbour, job)
        # Join of 1000 rooms that do not exist: the error budget closes it.
        async with connect(base) as ws:
            await auth(ws, token)
            for i in range(1000):
                try:
                    await send(ws, type="join", roomId=f"job:r{i}")
                except Exception:  # noqa: BLE001 - closed mid-flood: that is the point
                    break
            assert await closed_with(ws) == (1008, "too many errors")
        # Chat flood in a joined room: rate limited, then 4429.
        async with connect(base) as ws:
            await auth(ws, token)
            await join(ws, job)
            for i in range(200):
                try:
                    await send(
                        ws, type="chat", roomId=room, requestId=f"f{i}", text="x"
                    )
                except Exception:  # noqa: BLE001
                    break
            assert await closed_with(ws) == (4429, "rate limited")
        # A used ticket is refused.
        async with httpx.AsyncClient(base_url=base) as client:
            resp = await client.post(
                "/api/ws-tickets", headers={"Authorization": f"Bearer {token}"}
            )
            ticket = resp.json()["ticket"]
        async with connect(base) as first, connect(base) as replay:
            await auth(first, ticket)
            await send(replay, type="auth", token=ticket)
            assert await closed_with(replay) == (4403, "auth failed")
        # Pings are answered, however many.
        async with connect(base, max_queue=None) as ws:
            await auth(ws, token)
            for _ in range(500):
                await send(ws, type="ping")
            pongs = 0
            with anyio.fail_after(10):
                while pongs < 500:
                    pongs += json.loads(await ws.recv())["type"] == "pong"
        sent = await publish(redis, job, 3)
        got: list[str] = []  # the flood's accepted chats come first
        while sent[-1] not in got:
            got += [
                e["id"]
                for e in await collect_events(neighbour, 1)
                if e["type"] == "event"
            ]
        assert got[-3:] == sent
    assert token not in caplog.text and ticket not in caplog.text


async def test_since_ahead_of_head_is_a_gap_not_silence(
    make_settings: Callable[..., Any], store: Store, redis: Any
) -> None:
    """A ``since`` beyond the room's head (an id from another room, a Redis
    restored from an older snapshot) must not silence the connection: live
    items are only sent when greater than the last id, so the server answers
    ``gap`` and replays what is retained instead."""
    token = await store.token(role="admin", team="t1")
    job = await store.job(team="t1")
    sent = await publish(redis, job, 2)
    async with (
        serve(make_settings(**FAST)) as (base, _app),
        connect(base, max_queue=None) as ws,
    ):
        await auth(ws, token)
        await send(ws, type="join", roomId=f"job:{job}", since="9999999999999-0")
        with anyio.fail_after(5):
            while (msg := json.loads(await ws.recv()))["type"] != "gap":
                assert msg["type"] in ("joined", "presence"), msg
        sent += await publish(redis, job, 1, start=2)
        got = [e["id"] for e in await collect_events(ws, 3)]
        assert got == sent


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_deep_nesting_and_bad_utf8_stay_boring(
    make_settings: Callable[..., Any], store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2 KB frame of brackets before auth closes 1008 naming the limit (not 1011 with a
    RecursionError); invalid UTF-8 frames are counted, not logged with a traceback each."""
    from progress_service import metrics  # noqa: PLC0415

    caplog.set_level(logging.INFO)
    uvicorn_log = _Collect()  # uvicorn's loggers do not propagate to caplog
    logging.getLogger("uvicorn.error").addHandler(uvicorn_log)
    token = await store.token(role="admin")
    job = await store.job()
    counter = metrics.ws_client_frame_errors.labels("invalid UTF-8")
    before = counter._value.get()
    try:
        async with serve(make_settings(**FAST)) as (base, _app):
            for frame in (
                "[" * 1000 + "]" * 1000,  # the reported 2 KB frame
                '{"x":' + "[" * 1000 + "]" * 1000 + ',"type":"auth","token":"t"}',  # skipped while looking for the tag
                '{"type":"auth","token":' + "[" * 17 + "]" * 17 + "}",
            ):
                async with connect(base) as ws:
                    await ws.send(frame)
                    assert await closed_with(ws) == (1008, "JSON nested deeper than 16 levels"), frame[:40]
            async with connect(base) as ws:  # brackets inside strings are text, not nesting
                await auth(ws, token)
                await join(ws, job)
                await send(ws, type="chat", roomId=f"job:{job}", requestId="brackets", text="[{" * 40)
                with anyio.fail_after(10):
                    while (msg := json.loads(await ws.recv())).get("type") != "ack":
                        assert msg.get("type") != "error", msg
            for _ in range(10):
                raw = await Raw.open(base, token)
                await raw.send(_frame(1, b'{"type":"ping","x":"\xff\xfe"}'))
                assert await raw.close_code() == 1007
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_log)
    assert counter._value.get() - before == 10
    everything = [*uvicorn_log.records, *caplog.records]
    assert not [r for r in everything if r.exc_info], [r.getMessage() for r in everything if r.exc_info]
    assert "RecursionError" not in caplog.text
    warnings = [r for r in uvicorn_log.records if "invalid UTF-8" in r.getMessage()]
    assert len(warnings) <= 1 and all(r.levelno == logging.WARNING for r in warnings)
