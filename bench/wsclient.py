"""A minimal asyncio WebSocket client for load generation.

Why not the ``websockets`` library: the load generator shares the 2-core
machine with the server it measures, so every microsecond it spends per frame
is taken from the server. This client does the least RFC 6455 requires of a
client: the HTTP upgrade, masked text frames out, unmasked frames in
(reassembling fragments), answering protocol pings (uvicorn drops a
connection whose pong does not come) and the close handshake. No extensions
(the service turns per-message deflate off).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable

_OP_CONT, _OP_TEXT, _OP_BIN, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeError(Exception):
    """The server refused the upgrade (e.g. HTTP 403)."""


class Closed(Exception):
    """The connection is closed; ``code`` is the close code (1006: no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def _mask(payload: bytes, key: bytes) -> bytes:
    # Masking by whole-int XOR is far faster than a per-byte loop.
    n = len(payload)
    if n == 0:
        return payload
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class _Protocol(asyncio.Protocol):
    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshake: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[Closed] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.bytes_in = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self.upgraded = True
            if not self.handshake.done():
                self.handshake.set_result(head)
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                hdr = 10
            if n - pos < hdr + length:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + length])
            pos += hdr + length
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == _OP_TEXT or opcode == _OP_BIN:
                if fin:
                    self.on_message(payload)
                else:
                    self.fragments = [payload]
            elif opcode == _OP_CONT:
                self.fragments.append(payload)
                if fin:
                    msg = b"".join(self.fragments)
                    self.fragments = []
                    self.on_message(msg)
            elif opcode == _OP_PING:
                self._write(encode_frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode(errors="replace")
                self._write(encode_frame(_OP_CLOSE, payload[:2]))
                self._finish(Closed(code, reason))
                if self.transport is not None:
                    self.transport.close()
                break
        if pos:
            del buf[:pos]

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self, exc: Closed) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(f"connection closed during handshake ({exc.code})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(Closed(1006, "connection lost"))


class WSClient:
    """One WebSocket connection; incoming messages go to ``on_message(bytes)``.

    Delivery is a plain callback (no queue, no task per message): the load
    generator's cost per message stays one function call.
    """

    def __init__(self, protocol: _Protocol) -> None:
        self._p = protocol

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str, on_message: Callable[[bytes], None], *, timeout: float = 30.0
    ) -> WSClient:
        """Open the TCP connection and complete the upgrade; raises HandshakeError/OSError."""
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(lambda: _Protocol(on_message), host, port)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert proto.transport is not None
            proto.transport.write(request.encode())
            try:
                head = await proto.handshake
            except BaseException:
                proto.transport.abort()
                raise
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            proto.transport.abort()
            raise HandshakeError(status.decode(errors="replace"))
        return cls(proto)

    def send_text(self, text: str | bytes) -> None:
        """Queue one text frame (the socket buffers it; no await needed)."""
        data = text.encode() if isinstance(text, str) else text
        self._p._write(encode_frame(_OP_TEXT, data))

    @property
    def closed(self) -> asyncio.Future[Closed]:
        """Resolves with :class:`Closed` when the connection ends."""
        return self._p.closed

    @property
    def is_open(self) -> bool:
        return not self._p.closed.done()

    @property
    def bytes_in(self) -> int:
        return self._p.bytes_in

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """Polite close: send a close frame, wait briefly for the server's, then drop."""
        if self.is_open:
            self._p._write(encode_frame(_OP_CLOSE, struct.pack("!H", code)))
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._p.closed)
            except TimeoutError:
                pass
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self._p.transport is not None:
            self._p.transport.abort()
