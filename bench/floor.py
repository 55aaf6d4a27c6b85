"""uvicorn's own floor under a join storm: the gateway's uvicorn setup with an app that does nothing else.

A connect + auth + join of the project costs uvicorn's HTTP parsing, the
WebSocket handshake, the ASGI task and messages, and then the gateway's own
work (credentials, the per-user cap, authorization, presence, the snapshot
and replay). To say which part is which, ``seed_compare`` runs the same
join storm against this server too: the same uvicorn settings and the same
WebSocket protocol class (:class:`DirectSendProtocol`), and an ASGI app that
accepts, decodes each frame with the gateway's decoder and answers ``auth``
with ``auth_ok`` and ``join`` with a bare ``joined``. No authentication, no
Redis, no store: what it costs is what uvicorn costs.

``python -m bench.floor PORT`` serves it on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import uvicorn

from bench.server_process import ServerProcess
from progress_service.events import ClientAuth, ClientJoin
from progress_service.gateway.frames import client_decoder
from progress_service.server import connection_options, tune_gc
from progress_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

_enc = msgspec.json.Encoder()
_AUTH_OK = _enc.encode({"type": "auth_ok", "connectionId": "floor", "userId": "floor", "heartbeatMs": 25000,
                        "expiresAt": 0}).decode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accept, then answer ``auth`` and ``join`` until the client goes."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (event := await receive())["type"] == "websocket.receive":
        message = client_decoder.decode(event.get("text") or "")
        if isinstance(message, ClientAuth):
            await send({"type": "websocket.send", "text": _AUTH_OK})
        elif isinstance(message, ClientJoin):
            joined = _enc.encode({"type": "joined", "roomId": message.roomId, "presence": []}).decode()
            await send({"type": "websocket.send", "text": joined})


def main(port: int) -> None:
    """Serve :func:`app` with the gateway's uvicorn WebSocket settings."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                            **connection_options(Settings()))
    server = uvicorn.Server(config)
    tune_gc()
    asyncio.run(server.serve())


class FloorServer(ServerProcess):
    """:func:`main` as a subprocess on a free port, optionally pinned to ``cpus``. Use as a context manager."""

    def __enter__(self) -> FloorServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
        self.spawn("uvicorn floor", [sys.executable, "-m", "bench.floor", str(self.port)], env=env, cwd=ROOT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]))
