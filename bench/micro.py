"""In-process micro-benchmarks of the gateway's per-delivery hot path.

End-to-end runs on a shared 2-core machine are noisy (±10 %), and batching
makes CPU per delivery depend on speed. These loops isolate one cost each,
so a change to the hot path can say what it saves per delivery:

- ``outbox_put``: the hub's fan-out step, ``Outbox.put`` per member per event;
- ``outbox_take``: building one batch frame (``Outbox._take``) per connection;
- ``outbox_chunk``: the same per delivery when the hub queues one answer of
  ANSWER entries as one shared chunk (``Outbox.put_chunk``), plus the take;
- ``wire_bytes``: encoding one stream entry (done once per event, not per member);
- ``room_fanout``: the whole step from a hub read to the sockets: ``Hub._deliver``
  of READ_ENTRIES entries per read to MEMBERS live batching members whose
  outboxes write through to real sockets (socket pairs), each read's write
  window ending before the next; CPU per delivery, the kernel's share of each
  ``send`` included;
- ``tcp_send``: the floor under any fan-out here, the CPU of one
  ``transport.write`` of one frame to one of MEMBERS loopback TCP
  connections (the kernel's loopback delivery is charged to the sender).

``python -m bench micro`` prints one JSON line per measurement (ns per operation).
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
import types
from typing import Any

import anyio

MEMBERS = 1000
EVENTS = 200
ROUNDS = 3


def _fanout() -> tuple[float, float, float]:
    """ns per ``Outbox.put`` (one delivery) and per batch frame, for MEMBERS outboxes x EVENTS events."""
    from progress_service.gateway.outbox import Outbox

    outboxes = [Outbox(1 << 30, batch=True) for _ in range(MEMBERS)]
    text = '{"type":"event","roomId":"job:x","id":"1-1","kind":"log","at":1,"data":{"line":"' + "x" * 120 + '"}}'
    size = len(text)
    start = time.perf_counter_ns()
    for _ in range(EVENTS):
        for ob in outboxes:
            ob.put(text, size)
    took = time.perf_counter_ns() - start
    # drain, so the take benchmark has realistic batches
    take_start = time.perf_counter_ns()
    frames = 0
    for ob in outboxes:
        while len(ob):
            ob._take()
            frames += 1
    take_took = time.perf_counter_ns() - take_start
    for ob in outboxes:
        ob.close()
    return took / (MEMBERS * EVENTS), take_took / max(frames, 1), EVENTS * MEMBERS / max(frames, 1)


ANSWER = 22


def _chunk_fanout(batch: bool) -> float:
    """ns per delivery, put + take, when each answer of ANSWER entries is one shared chunk."""
    from progress_service.gateway.outbox import Chunk, Outbox

    outboxes = [Outbox(1 << 30, batch=batch) for _ in range(MEMBERS)]
    text = '{"type":"event","roomId":"job:x","id":"1-1","kind":"log","at":1,"data":{"line":"' + "x" * 120 + '"}}'
    answers = EVENTS // ANSWER
    start = time.perf_counter_ns()
    for _ in range(answers):
        chunk = Chunk.of([text] * ANSWER, [len(text)] * ANSWER)
        for ob in outboxes:
            ob.put_chunk(chunk)
        for ob in outboxes:
            while len(ob):
                ob._take()
    took = time.perf_counter_ns() - start
    for ob in outboxes:
        ob.close()
    return took / (MEMBERS * answers * ANSWER)


def _wire_bytes() -> float:
    from progress_service.streams import wire_bytes

    fields = {b"t": b"event", b"b": b'{"kind":"log","at":1,"data":{"line":"' + b"x" * 120 + b'"}}'}
    n = 100_000
    start = time.perf_counter_ns()
    for _ in range(n):
        raw = wire_bytes("job:abc", b"1700000000000-0", fields)
        raw.decode()
    return (time.perf_counter_ns() - start) / n


#: Entries per hub read in ``room_fanout`` (the job-event run of ``seed_compare`` reads 5-7).
READ_ENTRIES = 5
FANOUT_READS = 200


class _SocketSink:
    """The transport side of a ``FrameSink`` over a plain asyncio transport (no WebSocket handshake needed)."""

    __slots__ = ("_protocol", "_transport", "on_writable")

    def __init__(self, transport: asyncio.Transport, protocol: _Paused) -> None:
        self._transport = transport
        self._protocol = protocol
        self.on_writable = None

    @property
    def writable(self) -> bool:
        return self._protocol.writable

    def write(self, frame: bytes, payload: bytes) -> bool:
        if self._transport.is_closing():
            return False
        self._transport.write(frame)
        return True


class _Paused(asyncio.Protocol):
    writable = True

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_all(peers: list[socket.socket]) -> None:
    """Read what the server side wrote to each peer (so no socket fills)."""
    for peer in peers:
        try:
            while peer.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def _close(transports: list[asyncio.BaseTransport], peers: list[socket.socket]) -> None:
    for transport in transports:
        transport.close()
    for peer in peers:
        peer.close()


async def _room_fanout() -> float:
    """ns of CPU per delivery from ``Hub._deliver`` to the sockets of MEMBERS members."""
    from progress_service.gateway.hub import Hub, Member
    from progress_service.gateway.outbox import Outbox, WriteWindow

    loop = asyncio.get_running_loop()
    broker: Any = types.SimpleNamespace(subscribe=lambda room: None, unsubscribe=lambda room: None)
    hub = Hub(types.SimpleNamespace(redis=None, redis_url="", engine=None), "micro", broker=broker)  # type: ignore[arg-type]
    window = WriteWindow(0.002)
    peers, transports = [], []
    for _ in range(MEMBERS):
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, protocol = await loop.create_connection(_Paused, sock=ours)
        outbox = Outbox(1 << 22, batch=True, window=window)
        outbox.write_through(_SocketSink(transport, protocol), 5.0, lambda stalled: None)  # type: ignore[arg-type]
        member = Member(outbox)
        hub.add("job", member, head=None, presence_head=None)
        member.live = True
        peers.append(theirs)
        transports.append(transport)
    room = hub.rooms["job"]
    body = b'{"kind":"log","at":1,"data":{"stream":"stderr","line":"' + b"x" * 160 + b'"}}'
    seq, spent = 0, 0.0
    for _ in range(FANOUT_READS):
        entries = []
        for _ in range(READ_ENTRIES):
            seq += 1
            entries.append((f"{seq}-0".encode(), {b"t": b"event", b"b": body}))
        start = _cpu()
        hub._deliver(room, entries, 0)
        await asyncio.sleep(0.004)  # the write window ends in here
        spent += _cpu() - start
        _read_all(peers)  # the readers (not counted)
    _close(transports, peers)
    return spent * 1e9 / (FANOUT_READS * READ_ENTRIES * MEMBERS)


async def _tcp_send(size: int) -> float:
    """ns of CPU per ``transport.write`` of a ``size``-byte frame to one of MEMBERS loopback TCP connections."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=MEMBERS)
    peers, transports = [], []
    for _ in range(MEMBERS):
        theirs = socket.create_connection(listener.getsockname())
        ours, _addr = listener.accept()
        theirs.setblocking(False)
        transport, _protocol = await loop.create_connection(_Paused, sock=ours)
        peers.append(theirs)
        transports.append(transport)
    listener.close()
    frame = b"x" * size
    spent = 0.0
    for _ in range(FANOUT_READS):
        start = _cpu()
        for transport in transports:
            transport.write(frame)
        spent += _cpu() - start
        _read_all(peers)
    _close(transports, peers)
    return spent * 1e9 / (FANOUT_READS * MEMBERS)


async def _main() -> list[dict]:
    out = []
    for round_ in range(ROUNDS):
        put_ns, take_ns, per_frame = _fanout()
        out.append({"micro": "outbox_put", "round": round_ + 1, "ns_per_delivery": round(put_ns, 1),
                    "take_ns_per_frame": round(take_ns, 1), "messages_per_frame": round(per_frame, 1)})
    for batch in (True, False):
        out.append({"micro": "outbox_chunk", "batch": batch, "answer": ANSWER,
                    "ns_per_delivery": round(_chunk_fanout(batch), 1)})
    out.append({"micro": "wire_bytes", "ns_per_event": round(_wire_bytes(), 1)})
    for round_ in range(ROUNDS):
        out.append({"micro": "room_fanout", "round": round_ + 1, "members": MEMBERS, "read_entries": READ_ENTRIES,
                    "cpu_ns_per_delivery": round(await _room_fanout())})
    for size in (300, 1500, 8000):
        out.append({"micro": "tcp_send", "frame_bytes": size, "cpu_ns_per_write": round(await _tcp_send(size))})
    return out


def main() -> int:
    """Print one JSON line per micro-benchmark."""
    for line in anyio.run(_main):
        print(json.dumps(line))
    return 0
