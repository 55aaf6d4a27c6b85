"""Frames written straight to the transport: the frame encoding, the outbox's write-through, the server's protocol.

The outbox tests give it a recording sink (the transport's side of
:class:`FrameSink`); the server tests run the real uvicorn protocol on
loopback and read its frames with the ``websockets`` client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from progress_service.gateway.direct_send import DirectSendProtocol, text_frame
from progress_service.gateway.outbox import BATCH_FRAME_BYTES, Chunk, Outbox, WriteWindow
from frame_sinks import RecordingSink, parse_frame
from gateway_helpers import auth, connect, join, publish, serve


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_text_frame_is_what_a_websocket_client_parses(size: int) -> None:
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    assert parse_frame(text_frame(payload)).encode() == payload


def _writing(timeout: float, **kw: Any) -> tuple[Outbox, RecordingSink, list[bool]]:
    """An outbox writing through to a recording sink, and the list its ``on_broken`` calls append to."""
    sink = RecordingSink()
    outbox = Outbox(1 << 20, **kw)
    broken: list[bool] = []
    outbox.write_through(sink, timeout, broken.append)
    return outbox, sink, broken


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.002)


async def test_members_in_step_share_one_frame_of_several_reads() -> None:
    """Three hub reads inside one window: each batching outbox writes one frame, the same bytes for all."""
    window = WriteWindow(0.05)
    sinks = [RecordingSink() for _ in range(3)]
    outboxes = [Outbox(1 << 20, batch=True, window=window) for _ in sinks]
    for outbox, sink in zip(outboxes, sinks, strict=True):
        outbox.write_through(sink, 5.0, lambda stalled: None)
    chunks = [Chunk.of([f'{{"n":{i}}}', f'{{"m":{i}}}'], [7, 7]) for i in range(3)]
    for chunk in chunks:
        for outbox in outboxes:
            outbox.put_chunk(chunk)
        await anyio.sleep(0)
    await _until(lambda: all(s.frames for s in sinks))
    assert [len(s.frames) for s in sinks] == [1, 1, 1]
    assert sinks[0].frames[0] is sinks[1].frames[0] is sinks[2].frames[0]  # encoded once
    assert json.loads(sinks[0].texts()[0]) == [{"n": 0}, {"m": 0}, {"n": 1}, {"m": 1}, {"n": 2}, {"m": 2}]
    assert all(o.messages_sent == 6 and len(o) == 0 for o in outboxes)


async def test_replies_in_one_turn_of_the_loop_share_a_frame_and_do_not_wait_for_the_window() -> None:
    sink = RecordingSink()
    outbox = Outbox(1 << 20, batch=True, window=WriteWindow(10.0))
    outbox.write_through(sink, 5.0, lambda stalled: None)
    outbox.put('{"a":1}', 7)
    outbox.put('{"b":2}', 7)
    assert sink.frames == []  # written soon, not inside put
    await _until(lambda: bool(sink.frames))
    assert sink.texts() == ['[{"a":1},{"b":2}]']
    # not batching: one message per frame, in order
    plain_sink = RecordingSink()
    plain = Outbox(1 << 20)
    plain.write_through(plain_sink, 5.0, lambda stalled: None)
    plain.put_chunk(Chunk.of(['{"c":3}', '{"d":4}'], [7, 7]))
    plain.put('{"e":5}', 7)
    await _until(lambda: len(plain_sink.frames) == 3)
    assert plain_sink.texts() == ['{"c":3}', '{"d":4}', '{"e":5}']


async def test_a_paused_transport_holds_frames_until_it_drains() -> None:
    outbox, sink, broken = _writing(5.0, batch=True)
    sink.writable = False
    for i in range(5):
        outbox.put(f'{{"n":{i}}}', 7)
        await anyio.sleep(0.005)
    assert sink.frames == [] and len(outbox) == 5
    sink.resume()
    assert json.loads(sink.texts()[0]) == [{"n": i} for i in range(5)]
    assert len(outbox) == 0 and broken == []
    outbox.put('{"n":5}', 7)  # and it writes on its own again
    await _until(lambda: len(sink.frames) == 2)


async def test_a_transport_paused_past_the_timeout_is_a_stalled_reader() -> None:
    outbox, sink, broken = _writing(0.2)
    sink.writable = False
    outbox.put("x", 1)
    start = anyio.current_time()
    await _until(lambda: bool(broken))
    assert broken == [True]
    assert 0.2 <= anyio.current_time() - start < 2
    assert sink.on_writable is None  # detached: a late resume writes nothing
    sink.writable = True
    outbox.put("y", 1)
    await anyio.sleep(0.02)
    assert sink.frames == []


async def test_pauses_that_drain_in_between_are_not_a_stall() -> None:
    """The stall timeout is per pause, as the pump's is per frame: paused thrice, each under it, together over it."""
    # margins for a busy machine: each pause 0.6 s, the timeout 1.5 s, the three 1.8 s
    outbox, sink, broken = _writing(1.5)
    real_write = sink.write

    def write_then_pause(frame: bytes, payload: bytes) -> bool:
        sink.writable = False  # each frame takes the transport over its high water mark
        return real_write(frame, payload)

    sink.write = write_then_pause  # type: ignore[method-assign]
    for i in range(4):
        outbox.put(str(i), 1)
    await _until(lambda: len(sink.frames) == 1)
    for n in (2, 3, 4):
        await anyio.sleep(0.6)
        sink.resume()  # the transport drained: one more frame goes, and it pauses again
        assert len(sink.frames) == n
    assert sink.texts() == ["0", "1", "2", "3"] and broken == []
    outbox.put("4", 1)
    await _until(lambda: bool(broken))  # this one pause outlasts the timeout
    assert broken == [True]


async def test_a_gone_connection_is_reported_once_and_nothing_more_is_written() -> None:
    outbox, sink, broken = _writing(5.0)
    sink.gone = True
    outbox.put("x", 1)
    outbox.put("y", 1)
    await _until(lambda: bool(broken))
    await anyio.sleep(0.02)
    assert broken == [False]


async def test_a_chunk_over_a_frame_is_split_across_frames_in_order() -> None:
    sink = RecordingSink()
    outbox = Outbox(1 << 22, batch=True, window=WriteWindow(0.01))
    outbox.write_through(sink, 5.0, lambda stalled: None)
    big = "x" * (BATCH_FRAME_BYTES // 3)
    texts = [f'"{big}{i}"' for i in range(7)]
    outbox.put_chunk(Chunk.of(texts, [len(t) for t in texts]))
    await _until(lambda: outbox.messages_sent == 7)
    frames = [json.loads(f) for f in sink.texts()]
    got = [m for f in frames for m in (f if isinstance(f, list) else [f])]  # a lone message goes bare
    assert got == [json.loads(t) for t in texts]
    assert len(sink.frames) > 1


# --------------------------------------------------------------------------
# The server's protocol on loopback
# --------------------------------------------------------------------------


async def test_the_server_writes_through_and_a_plain_uvicorn_protocol_still_works(make_settings: Callable[..., Any], store: Any, redis: Any) -> None:
    """Both the server's protocol and uvicorn's own deliver a replay and live events in order."""
    for ws in (DirectSendProtocol, "websockets-sansio"):
        async with serve(make_settings(), ws=ws) as (base, app):
            token, job = await store.token(), await store.job()
            ids = await publish(redis, job, 200)
            async with connect(base) as client:
                await auth(client, token, batch=True)
                await join(client, job)
                got: list[str] = []
                with anyio.fail_after(10):
                    while len(got) < 200:
                        msg = json.loads(await client.recv())
                        got += [m["id"] for m in (msg if isinstance(msg, list) else [msg]) if m["type"] == "event"]
                assert got == ids
                sessions = list(app.state.services.gateway.sessions.values())
                assert len(sessions) == 1
                writes_through = sessions[0]._sender is None
                assert writes_through is (ws is DirectSendProtocol)


async def test_the_lighter_receive_queue_and_writable_flag_keep_uvicorns_contract() -> None:
    """What uvicorn asks of ``asyncio.Queue`` (put_nowait, get, empty) and ``asyncio.Event`` (set, clear, wait)."""
    from progress_service.gateway.direct_send import _Flag, _Inbox  # noqa: PLC0415

    inbox = _Inbox()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert not inbox.empty()
    assert [await inbox.get(), await inbox.get()] == [1, 2] and inbox.empty()
    got: list[int] = []

    async def reader() -> None:
        got.append(await inbox.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.01)
        inbox.put_nowait(3)
    assert got == [3]
    with anyio.move_on_after(0.02):  # a cancelled get loses nothing
        await inbox.get()
    inbox.put_nowait(4)
    assert await inbox.get() == 4

    flag = _Flag()
    assert flag.is_set()
    await flag.wait()
    flag.clear()
    woke: list[bool] = []

    async def sender() -> None:
        await flag.wait()
        woke.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        tg.start_soon(sender)
        await anyio.sleep(0.01)
        assert woke == []
        flag.set()
    assert woke == [True, True]


async def test_reading_pauses_once_several_client_messages_wait_and_resumes_when_read() -> None:
    """A client's messages are read on until ``INBOX_PAUSE_AT`` wait for the app (uvicorn paused after each)."""
    import uvicorn  # noqa: PLC0415
    import websockets  # noqa: PLC0415

    from progress_service.embedded_redis import free_port  # noqa: PLC0415
    from progress_service.gateway.direct_send import INBOX_PAUSE_AT  # noqa: PLC0415

    protocols: list[DirectSendProtocol] = []

    class Probe(DirectSendProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            protocols.append(self)

    go = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await go.wait()
        n = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            n += 1
            await send({"type": "websocket.send", "text": f"{n}:{message['text']}"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws=Probe, lifespan="off", log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await _until(lambda: server.started)
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as client:
            await _until(lambda: bool(protocols))
            protocol = protocols[0]
            for i in range(INBOX_PAUSE_AT - 1):
                await client.send(f"m{i}")
            await _until(lambda: protocol.queue.qsize() == INBOX_PAUSE_AT - 1)
            assert not protocol.read_paused and protocol.transport.is_reading()
            await client.send(f"m{INBOX_PAUSE_AT - 1}")
            await _until(lambda: protocol.read_paused)
            assert not protocol.transport.is_reading()
            await client.send("after the pause")  # stays in the socket until the app reads
            go.set()
            want = [f"m{i}" for i in range(INBOX_PAUSE_AT)] + ["after the pause"]
            with anyio.fail_after(5):
                got = [await client.recv() for _ in want]
            assert got == [f"{n}:{text}" for n, text in enumerate(want, 1)]
            assert not protocol.read_paused and protocol.transport.is_reading()
        server.should_exit = True
