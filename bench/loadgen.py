"""Load generator: one process driving many WebSocket clients of the protocol.

Each worker process (``worker_main``) runs its share of clients on its own
event loop (uvloop), so the load never shares the server's loop. A client
authenticates, joins its rooms, counts and times every event, checks the
publisher's per-room ``seq`` for loss and duplicates, optionally reconnects
with the protocol's full-jitter backoff and resumes with ``since``, and — as a
reviewer — posts comments back to back, each after the previous ack.

Latency is publish→receipt: the publisher stamps ``data.ts`` with
``time.time_ns()`` (same machine, same clock) and the client subtracts it
from the time the frame arrived.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field

import msgspec

from bench.control import CONNECT, MEASURE, STOP, WARMUP, Control
from bench.stats import Histogram
from bench.tuning import raise_nofile, run
from bench.wsclient import Closed, HandshakeError, WSClient

#: Protocol reconnect policy (docs/protocol.md): full jitter, base 500 ms, cap 20 s, reset after 10 s up.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 20.0
BACKOFF_RESET_AFTER = 10.0
#: Close codes after which a client must not retry.
NO_RETRY = {4403, 1003, 1009}


class Unavailable(Exception):
    """The server answered ``error unavailable`` to a join: retry later."""


class _Data(msgspec.Struct):
    ts: int = 0
    seq: int = 0


class _Msg(msgspec.Struct):
    """Only the fields the load generator reads; msgspec skips the rest cheaply."""

    type: str
    roomId: str | None = None
    id: str | None = None
    data: _Data | None = None
    requestId: str | None = None
    code: str | None = None
    text: str | None = None
    message: str | None = None


#: What an echoed comment (``echo_acks``) resolves its sender's wait with.
_ACK = _Msg(type="ack")

_decode = msgspec.json.Decoder(list[_Msg] | _Msg).decode
_encode = msgspec.json.Encoder().encode


@dataclass
class ClientSpec:
    """One simulated user connection."""

    token: str
    rooms: list[str]
    batch: bool = False
    #: ``reviewer`` posts comments in ``rooms[0]`` as fast as acks come back.
    role: str = "watcher"


@dataclass
class WorkerConfig:
    host: str
    port: int
    clients: list[ClientSpec]
    #: Index of every room id in ``Control.target``.
    room_index: dict[str, int]
    reconnect: bool = False
    #: Handshakes in flight at once from this process.
    connect_concurrency: int = 100
    #: How often shared counters are refreshed (the closed loop wants this short).
    report_interval: float = 0.05
    #: Room whose min seq feeds ``Control.progress`` (closed-loop publisher), if any.
    progress_room: str | None = None
    path: str = "/ws"
    #: Backoff cap (s): the protocol's 20 s; quick runs use less so the smoke test stays short.
    backoff_cap: float = BACKOFF_CAP
    #: Comments each reviewer keeps in flight (each of them sent after the previous one's answer).
    chats_in_flight: int = 1
    #: Pad each comment's text to this many characters (0: the short default text).
    chat_chars: int = 0
    #: The seed's protocol has no ``ack``: the comment's own broadcast, matched by requestId, answers it.
    echo_acks: bool = False
    #: CPUs this process is pinned to (None: wherever the scheduler puts it).
    cpus: tuple[int, ...] | None = None


@dataclass
class Totals:
    """Counters of one worker, sent to the orchestrator at the end."""

    delivered: int = 0
    delivered_all: int = 0
    chats_delivered: int = 0
    lost: int = 0
    dup: int = 0
    gaps: int = 0
    frames: int = 0
    #: Frames received during the measured phase.
    frames_measured: int = 0
    acks: int = 0
    retries: int = 0
    chat_errors: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Worker:
    def __init__(self, index: int, cfg: WorkerConfig, ctl: Control) -> None:
        self.index = index
        self.cfg = cfg
        self.ctl = ctl
        self.phase = CONNECT
        self.measuring = False
        self.t = Totals()
        self.latency = Histogram()
        self.ack_latency = Histogram()
        self.chat_latency = Histogram()
        self.clients = [Client(self, spec) for spec in cfg.clients]
        self.sem = asyncio.Semaphore(cfg.connect_concurrency)
        self.joined = 0
        self.rejoined = 0
        self.failed = 0
        self.first_joined_at: list[float] = []
        self.rejoin_at: list[float] = []
        self.unavailable = False

    async def watch_phase(self) -> None:
        """Mirror the shared phase locally and publish this worker's counters."""
        ctl, i = self.ctl, self.index
        room = self.cfg.progress_room
        while True:
            phase = ctl.phase.value
            if phase != self.phase:
                self.phase = phase
                self.measuring = phase == MEASURE
            ctl.joined[i] = self.joined
            ctl.rejoined[i] = self.rejoined
            ctl.failed[i] = self.failed
            if room is not None:
                ctl.progress[i] = min((c.last_seq.get(room, 0) for c in self.clients), default=0)
            targets = {r: ctl.target[k] for r, k in self.cfg.room_index.items()}
            if any(targets.values()):
                ctl.caught_up[i] = sum(
                    1 for c in self.clients if all(c.last_seq.get(r, 0) >= targets[r] for r in c.spec.rooms)
                )
            if phase == STOP:
                return
            await asyncio.sleep(self.cfg.report_interval)

    async def main(self) -> dict:
        self.ctl.ready[self.index] = 1
        while not self.ctl.go.value:
            await asyncio.sleep(0.005)
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(self.watch_phase())
            sessions = [tg.create_task(c.session()) for c in self.clients]
            await watcher
            for c in self.clients:
                c.stopping = True
                if c.ws is not None:
                    c.ws.abort()
            for s in sessions:
                s.cancel()
        t = self.t
        return {
            "worker": self.index,
            "cpu_s": time.process_time(),
            "delivered": t.delivered,
            "delivered_all": t.delivered_all,
            "chats_delivered": t.chats_delivered,
            "frames": t.frames,
            "frames_measured": t.frames_measured,
            "lost": t.lost,
            "dup": t.dup,
            "gaps": t.gaps,
            "acks": t.acks,
            "retries": t.retries,
            "chat_errors": t.chat_errors,
            "errors": t.errors,
            "closes": t.closes,
            "failures": t.failures[:10],
            "failed": self.failed,
            "unavailable": self.unavailable,
            "latency": self.latency.export(),
            "ack_latency": self.ack_latency.export(),
            "chat_latency": self.chat_latency.export(),
            "first_joined_at": self.first_joined_at,
            "rejoin_at": self.rejoin_at,
        }


class Client:
    def __init__(self, w: Worker, spec: ClientSpec) -> None:
        self.w = w
        self.spec = spec
        self.ws: WSClient | None = None
        self.last_seq: dict[str, int] = {}
        self.last_id: dict[str, str] = {}
        self.stopping = False
        self.drops = 0
        self.rejoined_once = False
        self._auth: asyncio.Future[None] | None = None
        self._joins: dict[str, asyncio.Future[None]] = {}
        self._acks: dict[str, asyncio.Future[_Msg]] = {}

    # -- receive path: one callback per frame, no tasks -------------------

    def on_frame(self, raw: bytes) -> None:
        now = time.time_ns()
        w = self.w
        t = w.t
        measuring = w.measuring
        t.frames += 1
        if measuring:
            t.frames_measured += 1
        msg = _decode(raw)
        # Job events inline (one call per frame, not per message), the rest
        # through on_message: the load generator's one core is what limits a
        # fan-out run, so it must cost far less than the server it measures.
        record = w.latency.record
        last_seq, last_id = self.last_seq, self.last_id
        for m in msg if type(msg) is list else (msg,):
            if m.type != "event":
                self.on_message(m, now)
                continue
            t.delivered_all += 1
            room = m.roomId
            data = m.data
            if data is not None and data.seq:
                last = last_seq.get(room, 0)
                seq = data.seq
                if seq <= last:
                    t.dup += 1  # a resume re-sent it; a real client drops it by id
                    continue
                if seq > last + 1:
                    t.lost += seq - last - 1
                last_seq[room] = seq
            last_id[room] = m.id
            if measuring:
                t.delivered += 1
                if data is not None and data.ts:
                    record(now - data.ts)

    def on_message(self, m: _Msg, now: int) -> None:
        w = self.w
        kind = m.type
        if kind == "chat":
            self.last_id[m.roomId] = m.id
            if w.cfg.echo_acks and m.requestId is not None:
                fut = self._acks.pop(m.requestId, None)
                if fut is not None and not fut.done():
                    fut.set_result(_ACK)
            if w.measuring:
                w.t.chats_delivered += 1
                if m.text and m.text.startswith("bench "):
                    w.chat_latency.record(now - int(m.text.split(" ", 2)[1]))
        elif kind == "ack":
            fut = self._acks.pop(m.requestId, None)
            if fut is not None and not fut.done():
                fut.set_result(m)
        elif kind == "joined":
            fut = self._joins.get(m.roomId)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == "auth_ok":
            if self._auth is not None and not self._auth.done():
                self._auth.set_result(None)
        elif kind == "gap":
            w.t.gaps += 1
        elif kind == "error":
            code = m.code or "?"
            if m.requestId is not None:
                fut = self._acks.pop(m.requestId, None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
                return
            w.t.errors[code] = w.t.errors.get(code, 0) + 1
            fut = self._joins.get(m.roomId or "")
            if fut is not None and not fut.done():
                # `unavailable` (store slow under a burst) invites a retry; anything else is a bug here.
                exc_type = Unavailable if code == "unavailable" else RuntimeError
                fut.set_exception(exc_type(f"join refused: {code} {m.message}"))

    # -- session: connect, auth, join, (chat), reconnect -----------------

    async def _open(self) -> WSClient:
        cfg = self.w.cfg
        async with self.w.sem:
            ws = await WSClient.connect(cfg.host, cfg.port, cfg.path, self.on_frame)
            loop = asyncio.get_running_loop()
            self._auth = loop.create_future()
            auth = {"type": "auth", "token": self.spec.token, "client": "bench/1"}
            if self.spec.batch:
                auth["batch"] = True
            ws.send_text(_encode(auth))
            await self._until(ws, self._auth)
            self._joins = {room: loop.create_future() for room in self.spec.rooms}
            for room in self.spec.rooms:
                join: dict[str, str] = {"type": "join", "roomId": room}
                if room in self.last_id:
                    join["since"] = self.last_id[room]
                ws.send_text(_encode(join))
            for fut in self._joins.values():
                await self._until(ws, fut)
            return ws

    @staticmethod
    async def _until(ws: WSClient, fut: asyncio.Future) -> None:
        """Wait for ``fut``; raise Closed if the connection ends first."""
        async with asyncio.timeout(60):
            done, _ = await asyncio.wait({fut, ws.closed}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            fut.result()
            return
        raise ws.closed.result()

    async def session(self) -> None:
        w = self.w
        attempt = 0
        ever_joined = False
        while not self.stopping:
            try:
                ws = await self._open()
            except (OSError, HandshakeError, TimeoutError, Closed, RuntimeError, Unavailable) as exc:
                code = exc.code if isinstance(exc, Closed) else ("unavailable" if isinstance(exc, Unavailable) else None)
                if self.ws is not None:
                    self.ws.abort()
                # A refused connect (1011 under a burst, 4429, a restart) is retried as the
                # protocol tells clients to, in every scenario; it is counted, not hidden.
                w.t.retries += 1
                key = f"connect:{code if code is not None else type(exc).__name__}"
                w.t.closes[key] = w.t.closes.get(key, 0) + 1
                if code in NO_RETRY or isinstance(exc, RuntimeError) or (not w.cfg.reconnect and ever_joined):
                    w.failed += 1
                    w.t.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(w.cfg.backoff_cap, BACKOFF_BASE * 2**attempt)))
                continue
            self.ws = ws
            up_at = time.monotonic()
            w.joined += 1
            if not ever_joined:
                ever_joined = True
                w.first_joined_at.append(time.time())
            elif not self.rejoined_once:
                # Counted once per client: "all back" means every client, not N rejoins.
                self.rejoined_once = True
                w.rejoined += 1
                w.rejoin_at.append(time.time())
            try:
                if self.spec.role == "reviewer":
                    await self._review(ws)
                closed = await ws.closed
            finally:
                w.joined -= 1
            if self.stopping:
                return
            key = str(closed.code)
            w.t.closes[key] = w.t.closes.get(key, 0) + 1
            if not w.cfg.reconnect or closed.code in NO_RETRY:
                w.failed += 1
                w.t.failures.append(f"closed {closed.code} {closed.reason}")
                return
            self.drops += 1
            if time.monotonic() - up_at >= BACKOFF_RESET_AFTER:
                attempt = 0
            await asyncio.sleep(random.uniform(0, min(w.cfg.backoff_cap, BACKOFF_BASE * 2**attempt)))
            attempt += 1

    async def _review(self, ws: WSClient) -> None:
        """Keep ``chats_in_flight`` comments in flight, each lane sending after its previous ack, until STOP."""
        lanes = self.w.cfg.chats_in_flight
        if lanes <= 1:
            await self._review_lane(ws)
            return
        async with asyncio.TaskGroup() as tg:
            for _ in range(lanes):
                tg.create_task(self._review_lane(ws))

    async def _review_lane(self, ws: WSClient) -> None:
        w = self.w
        room = self.spec.rooms[0]
        loop = asyncio.get_running_loop()
        pad = max(0, w.cfg.chat_chars - 26)
        tail = ("x" * pad) if pad else "lgtm"
        while w.phase < WARMUP and ws.is_open:
            await asyncio.sleep(0.02)
        while w.phase < STOP and ws.is_open and not w.unavailable:
            rid = uuid.uuid4().hex
            fut: asyncio.Future[_Msg] = loop.create_future()
            self._acks[rid] = fut
            sent = time.time_ns()
            ws.send_text(_encode({"type": "chat", "roomId": room, "requestId": rid, "text": f"bench {sent} {tail}"}))
            try:
                await self._until(ws, fut)
            except Closed:
                return
            reply = fut.result()
            if reply.type == "ack":
                if w.measuring:
                    w.t.acks += 1
                    w.ack_latency.record(time.time_ns() - sent)
            else:
                code = reply.code or "?"
                w.t.chat_errors[code] = w.t.chat_errors.get(code, 0) + 1
                if code == "unavailable" and w.t.acks == 0:
                    # Comments are not wired in this build: report it, don't hammer.
                    w.unavailable = True
                    return
                await asyncio.sleep(0.01)


def worker_main(index: int, cfg: WorkerConfig, ctl: Control) -> None:
    """Entry point of a load-generator process."""
    raise_nofile()
    if cfg.cpus is not None:
        os.sched_setaffinity(0, cfg.cpus)
    try:
        result = run(Worker(index, cfg, ctl).main())
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator instead of dying silently
        result = {"worker": index, "crash": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    ctl.results.put(("worker", result))
