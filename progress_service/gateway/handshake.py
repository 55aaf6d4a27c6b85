"""A plain WebSocket opening handshake (RFC 6455 section 4.2), read and answered without a second HTTP parser.

uvicorn parses an upgrade request with httptools, then hands its WebSocket
protocol the request again, re-serialized as ``name: value`` lines with
lowercase names; websockets parses it a second time into ``Headers``,
checks it and builds a ``Response``: ~37 µs per connection, a tenth of a
join's CPU (docs/performance.md). :func:`parse_plain` reads a request it
can answer exactly as websockets would and :func:`accept_response` writes
that answer. It takes only a subset of what websockets accepts: one
request with nothing to negotiate (no subprotocol offered; extension offers
are ignored, as websockets does when none is enabled). Anything else, a
bad key, a repeated or missing header, a body, an unusual byte, a
request near websockets' limits, returns None and goes websockets' way,
which answers it as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from typing import NamedTuple

#: RFC 6455 section 1.3.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Larger requests go websockets' way (its limits: 8,192 bytes a line, 128 headers).
MAX_REQUEST_BYTES = 4096

#: Printable ASCII lines ending the request with an empty line; websockets allows more (obs-text), which it then checks.
_SHAPE = re.compile(rb"(?:[\t\x20-\x7e]+\r\n)+\r\n")
#: An HTTP token (RFC 9110 section 5.6.2): header names and Connection options.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")

#: Headers a plain request has exactly once (websockets refuses a repeated key, version or origin).
_ONCE = frozenset((b"host", b"upgrade", b"sec-websocket-key", b"sec-websocket-version", b"origin"))
#: Headers whose presence sends the request websockets' way (a body; a subprotocol to select).
_ELSEWHERE = frozenset((b"content-length", b"transfer-encoding", b"sec-websocket-protocol"))


class PlainRequest(NamedTuple):
    """What the ASGI scope needs of an accepted handshake, and the ``Sec-WebSocket-Accept`` it earns."""

    #: The request target as sent (path and query string), ASCII.
    target: str
    #: Lowercase names, values as sent: ASGI's ``headers``.
    headers: list[tuple[bytes, bytes]]
    accept: bytes


def parse_plain(data: bytes) -> PlainRequest | None:
    """``data`` as one complete, plain WebSocket upgrade request, or None (let websockets read it)."""
    if len(data) > MAX_REQUEST_BYTES or _SHAPE.fullmatch(data) is None:
        return None
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    headers: list[tuple[bytes, bytes]] = []
    once: dict[bytes, bytes] = {}
    upgrade_option = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name in _ELSEWHERE:
            return None
        if name in _ONCE:
            if name in once:
                return None
            once[name] = value
        elif name == b"connection":
            for option in value.split(b","):
                option = option.strip(b" \t")
                if option and _TOKEN.fullmatch(option) is None:
                    return None
                upgrade_option = upgrade_option or option.lower() == b"upgrade"
        headers.append((name, value))
    key = once.get(b"sec-websocket-key")
    if (
        not upgrade_option
        or b"host" not in once
        or once.get(b"upgrade", b"").lower() != b"websocket"
        or once.get(b"sec-websocket-version") != b"13"
        or key is None
    ):
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return PlainRequest(parts[1].decode("ascii"), headers, accept)


def accept_response(accept: bytes, headers: Iterable[tuple[bytes, bytes]], subprotocol: str | None) -> bytes:
    """The ``101 Switching Protocols`` answer, byte for byte as uvicorn and websockets write it."""
    out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
           accept, b"\r\n"]
    for name, value in headers:
        out += (name.lower(), b": ", value, b"\r\n")
    if subprotocol:
        out += (b"Sec-WebSocket-Protocol: ", subprotocol.encode("latin-1"), b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)
