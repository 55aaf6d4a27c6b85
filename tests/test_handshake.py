"""The plain handshake: a subset of what websockets accepts, answered byte for byte as it answers.

The parser is checked against websockets' own ``ServerProtocol`` on a corpus
of requests (valid ones and every way of getting one wrong); the server
test runs uvicorn with the server's protocol on loopback and compares the
answer to a plain request with websockets' answer to the same request.
"""

from __future__ import annotations

import base64
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from websockets.http11 import Request
from websockets.server import ServerProtocol

from progress_service.gateway.direct_send import DirectSendProtocol
from progress_service.gateway.handshake import parse_plain

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
BASE = [
    b"GET /ws HTTP/1.1",
    b"host: 127.0.0.1:8000",
    b"upgrade: websocket",
    b"connection: Upgrade",
    b"sec-websocket-key: " + KEY,
    b"sec-websocket-version: 13",
]
#: What Chromium sends (an extension offer included), as uvicorn re-serializes it.
BROWSER = [
    b"GET /ws HTTP/1.1",
    b"host: 127.0.0.1:8000",
    b"connection: Upgrade",
    b"pragma: no-cache",
    b"cache-control: no-cache",
    b"user-agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    b"upgrade: websocket",
    b"origin: http://127.0.0.1:8000",
    b"sec-websocket-version: 13",
    b"accept-encoding: gzip, deflate, br, zstd",
    b"accept-language: en-US,en;q=0.9",
    b"sec-websocket-key: " + KEY,
    b"sec-websocket-extensions: permessage-deflate; client_max_window_bits",
]


def _request(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def _websockets_answer(data: bytes) -> tuple[int, str | None]:
    """websockets' status for ``data`` and its ``Sec-WebSocket-Accept`` (None when refused or unparsed)."""
    conn = ServerProtocol(logger=logging.getLogger("test.handshake"))
    conn.receive_data(data)
    events = conn.events_received()
    if not events or not isinstance(events[0], Request):
        return 0, None
    response = conn.accept(events[0])
    return response.status_code, response.headers.get("Sec-WebSocket-Accept")


def _mutations(rng: random.Random) -> list[list[bytes]]:
    """Requests near a valid one: each header dropped, doubled, recased, respaced or spoiled, and a few more."""
    out: list[list[bytes]] = [BASE, BROWSER]
    for i in range(len(BASE)):
        out.append(BASE[:i] + BASE[i + 1 :])  # dropped
        if i:
            out.append(BASE + [BASE[i]])  # doubled
            name, _, value = BASE[i].partition(b": ")
            out.append(BASE[:i] + [name + b":" + value + b"  "] + BASE[i + 1 :])  # spacing
            out.append(BASE[:i] + [name + b": " + value.upper()] + BASE[i + 1 :])
            out.append(BASE[:i] + [name + b": " + value + b"x"] + BASE[i + 1 :])
            out.append(BASE[:i] + [name + b": "] + BASE[i + 1 :])
    for line in (b"POST /ws HTTP/1.1", b"GET /ws HTTP/1.0", b"GET  /ws HTTP/1.1", b"GET ws HTTP/1.1",
                 b"GET /ws?token=x&y=%20 HTTP/1.1", b"get /ws HTTP/1.1"):
        out.append([line, *BASE[1:]])
    for extra in (b"connection: keep-alive, Upgrade", b"connection: , upgrade,", b"connection: upgrade, @bad",
                  b"upgrade: websocket, h2c", b"upgrade: WebSocket", b"upgrade: websocket/13",
                  b"sec-websocket-protocol: chat", b"sec-websocket-protocol: a, b", b"content-length: 0",
                  b"content-length: 5", b"transfer-encoding: chunked", b"origin: http://a", b"x-empty: ",
                  b"x-tab:\tvalue", b"bad name: x", b"x-high: caf\xc3\xa9", b"x-ctl: a\x01b",
                  b"sec-websocket-extensions: permessage-deflate"):
        name = extra.split(b":")[0].lower()
        out.append([line for line in BASE if line.split(b":")[0] != name] + [extra])
        out.append(BASE + [extra])
    for n in (15, 17):  # a key of the wrong length
        out.append([*BASE[:4], b"sec-websocket-key: " + base64.b64encode(bytes(n)), BASE[5]])
    out.append([*BASE[:4], b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ", BASE[5]])  # no padding
    out.append(BASE + [b"x-long: " + b"a" * 5000])
    for _ in range(200):  # shuffled and with a random header recased
        lines = [BASE[0], *rng.sample(BASE[1:], len(BASE) - 1)]
        j = rng.randrange(1, len(lines))
        name, _, value = lines[j].partition(b": ")
        lines[j] = bytes(c ^ 0x20 if rng.random() < 0.5 and chr(c).isalpha() else c for c in name) + b": " + value
        out.append(lines)
    return out


def test_what_the_fast_path_accepts_websockets_accepts_with_the_same_key() -> None:
    rng = random.Random(12)
    taken = 0
    for lines in _mutations(rng):
        data = _request(lines)
        plain = parse_plain(data)
        status, accept = _websockets_answer(data)
        if plain is None:
            continue
        taken += 1
        assert status == 101, data
        assert plain.accept.decode() == accept, data
    assert taken > 200  # the usual requests do take it
    assert parse_plain(_request(BASE)) is not None and parse_plain(_request(BROWSER)) is not None


def test_the_scope_gets_what_uvicorn_gave_it() -> None:
    plain = parse_plain(_request([b"GET /ws?a=1 HTTP/1.1", *BROWSER[1:]]))
    assert plain is not None
    assert plain.target == "/ws?a=1"
    assert plain.headers == [tuple(line.split(b": ", 1)) for line in BROWSER[1:]]


@pytest.mark.parametrize("extra", [b"", b"sec-websocket-protocol: chat\r\n"])
def test_a_request_in_two_reads_or_one_with_a_subprotocol_goes_websockets_way(extra: bytes) -> None:
    data = _request(BASE)[:-2] + extra + b"\r\n"
    assert parse_plain(data[:40]) is None
    assert (parse_plain(data) is None) == bool(extra)


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.002)


async def test_the_server_answers_a_plain_handshake_as_websockets_does() -> None:
    """The same 101 (bar the date) for a plain request and one that websockets reads; both then carry frames."""
    import uvicorn  # noqa: PLC0415
    import websockets  # noqa: PLC0415

    from progress_service.embedded_redis import free_port  # noqa: PLC0415

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "headers": [(b"X-Extra", b"1")]})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"{scope['path']}?{scope['query_string'].decode()}:"
                        f"{dict(scope['headers'])[b'x-probe'].decode()}:{message['text']}"})

    opened: list[bool] = []  # per connection: did it take the plain path?

    class Probe(DirectSendProtocol):
        def _open_plain(self, request: Any) -> None:
            opened.append(True)
            super()._open_plain(request)

        def handle_connect(self, event: Request) -> None:
            opened.append(False)
            super().handle_connect(event)

    port = free_port()
    # As the server runs it (PS_WS_PER_MESSAGE_DEFLATE off: with it on, every handshake is websockets').
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws=Probe, lifespan="off",
                                           ws_per_message_deflate=False, log_level="warning"))

    def answer(extra: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(_request([b"GET /ws?q=1 HTTP/1.1", *BASE[1:], b"x-probe: p"])[:-2] + extra + b"\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
        return b"".join(line + b"\r\n" for line in data.split(b"\r\n") if not line.startswith(b"date: "))

    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await _until(lambda: server.started)
        plain = await anyio.to_thread.run_sync(answer, b"")
        read_by_websockets = await anyio.to_thread.run_sync(answer, b"sec-websocket-protocol: chat\r\n")
        assert plain.startswith(b"HTTP/1.1 101 ") and b"x-extra: 1\r\n" in plain
        assert plain == read_by_websockets
        assert opened == [True, False]
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?q=1", additional_headers={"X-Probe": "p"}) as client:
            await client.send("hello")
            with anyio.fail_after(5):
                assert await client.recv() == "/ws?q=1:p:hello"
        assert opened == [True, False, True]  # the websockets client's own request is a plain one
        server.should_exit = True
