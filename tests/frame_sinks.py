"""A recording stand-in for the transport side of :class:`~progress_service.gateway.direct_send.FrameSink`."""

from __future__ import annotations

from collections.abc import Callable

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from progress_service.gateway.direct_send import text_frame


class RecordingSink:
    """A transport that takes frames (or is paused, or gone), as :class:`FrameSink` reports it."""

    def __init__(self) -> None:
        self.writable = True
        self.gone = False
        self.on_writable: Callable[[], None] | None = None
        self.frames: list[bytes] = []

    def write(self, frame: bytes, payload: bytes) -> bool:
        if self.gone:
            return False
        assert frame == text_frame(payload)
        self.frames.append(frame)
        return True

    def resume(self) -> None:
        self.writable = True
        assert self.on_writable is not None
        self.on_writable()

    def texts(self) -> list[str]:
        return [parse_frame(f) for f in self.frames]


def parse_frame(frame: bytes) -> str:
    """Decode one server frame with websockets' own parser (unmasked, as a client reads it)."""
    reader = StreamReader()
    reader.feed_data(frame)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        parsed: Frame = done.value
    else:  # pragma: no cover - the frame was short
        raise AssertionError("incomplete frame")
    assert parsed.opcode is Opcode.TEXT and parsed.fin
    return bytes(parsed.data).decode()
