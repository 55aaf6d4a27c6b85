"""WebSocket frames to protocol messages and back.

:func:`decode_frame` applies the frame checks of docs/protocol.md
("Validation and limits") in their order: text only, size, nesting depth,
then the one strict decoder of the client union. What fails a check is
answered by the close it earns, never by an exception. :func:`encode` is
the other way: one server message as the text and byte size the outbox
counts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from progress_service import closes
from progress_service.closes import Close
from progress_service.events import ClientMessage
from progress_service.gateway.limits import json_too_deep

#: The one decoder of client messages (a strict tagged union).
client_decoder = msgspec.json.Decoder(ClientMessage)
_enc = msgspec.json.Encoder()


def encode(message: Any) -> tuple[str, int]:
    """A server message as text plus its encoded size in bytes."""
    raw = _enc.encode(message)
    return raw.decode(), len(raw)


def decode_frame(text: object, max_bytes: int, max_depth: int) -> ClientMessage | Close:
    """The client message in a received frame's ``text``, or the close it earns.

    ``text`` is the ASGI event's ``text`` (None for a binary frame).
    """
    if not isinstance(text, str):
        return closes.TEXT_ONLY
    # (a str of n characters is at most 4n bytes: most frames skip the encode)
    if len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes):
        return closes.TOO_LARGE
    if json_too_deep(text, max_depth):
        return closes.policy(f"JSON nested deeper than {max_depth} levels")
    try:
        return client_decoder.decode(text)
    except msgspec.ValidationError as exc:
        return closes.policy(str(exc))
    except msgspec.DecodeError:
        return closes.INVALID_JSON
    except RecursionError:  # (the depth check above makes this unreachable in practice)
        return closes.policy(f"JSON nested deeper than {max_depth} levels")
