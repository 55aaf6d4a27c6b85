"""In-process micro-benchmarks of the gateway's per-delivery hot path.

End-to-end runs on a shared 2-core machine are noisy (±10 %), and batching
makes CPU per delivery depend on speed. These loops isolate one cost each,
so a change to the hot path can say what it saves per delivery:

- ``outbox_put``: the hub's fan-out step, ``Outbox.put`` per member per event;
- ``outbox_take``: building one batch frame (``Outbox._take``) per connection;
- ``outbox_chunk``: the same per delivery when the hub queues one answer of
  ANSWER entries as one shared chunk (``Outbox.put_chunk``), plus the take;
- ``wire_bytes``: encoding one stream entry (done once per event, not per member).

``python -m bench micro`` prints one JSON line per measurement (ns per operation).
"""

from __future__ import annotations

import json
import time

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
    return out


def main() -> int:
    """Print one JSON line per micro-benchmark."""
    for line in anyio.run(_main):
        print(json.dumps(line))
    return 0
