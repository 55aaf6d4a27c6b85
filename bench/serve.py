"""Run the app under uvicorn with a chosen WebSocket implementation.

``progress-service serve`` does not expose uvicorn's ``--ws`` switch, so the
harness starts the same app the same way (``create_app`` + the project's
``Server``/``make_config``, PS_* settings from the environment) and only adds
``ws=...`` (and optionally uvloop).
Usage: ``python -m bench.serve --port N --ws websockets-sansio [--loop uvloop]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bench.tuning import raise_nofile
from progress_service.settings import load_settings


def _trace_memory(out: str) -> None:
    """``tracemalloc`` in the server: SIGUSR1 takes the baseline, SIGUSR2 writes what was allocated since.

    ``out`` gets one line per source line, ``<bytes> <count> <file>:<line>``,
    largest first: what the connections opened in between hold.
    """
    import signal
    import tracemalloc

    tracemalloc.start(1)
    base: list = []

    def baseline(*_: object) -> None:
        base[:] = [tracemalloc.take_snapshot()]

    def dump(*_: object) -> None:
        snap = tracemalloc.take_snapshot()
        stats = snap.compare_to(base[0], "lineno") if base else snap.statistics("lineno")
        with open(out + ".tmp", "w") as f:
            for st in stats[:200]:
                frame = st.traceback[0]
                f.write(f"{st.size_diff if base else st.size} {st.count_diff if base else st.count} "
                        f"{frame.filename}:{frame.lineno}\n")
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR1, baseline)
    signal.signal(signal.SIGUSR2, dump)


async def _serve(host: str, port: int, ws: str) -> None:
    """The same app and Server as ``progress-service serve``, with ``ws`` passed to uvicorn."""
    from progress_service.app import create_app
    from progress_service.server import Server, make_config

    settings = load_settings()
    assert settings.redis_url, "PS_REDIS_URL must be set"
    app = create_app(settings, redis_url=settings.redis_url, run_worker=False)
    from progress_service.gateway.direct_send import DirectSendProtocol

    protocol: type[asyncio.Protocol] | str = DirectSendProtocol if ws == "direct" else ws
    await Server(make_config(app, settings, host=host, port=port, ws=protocol)).serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    # direct: the server's own (websockets-sansio plus the gateway's frame writer)
    parser.add_argument("--ws", default="direct", choices=["direct", "auto", "websockets", "websockets-sansio", "wsproto"])
    # `progress-service serve` runs `asyncio.run(Server.serve())`, which bypasses uvicorn's
    # loop factory: stock asyncio. `--loop uvloop` measures what uvloop would change.
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--tracemalloc", metavar="FILE", help="trace allocations (SIGUSR1: baseline, SIGUSR2: write FILE)")
    args = parser.parse_args()
    raise_nofile()
    if args.tracemalloc:
        _trace_memory(args.tracemalloc)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_serve(args.host, args.port, args.ws))
    else:
        asyncio.run(_serve(args.host, args.port, args.ws))


if __name__ == "__main__":
    main()
