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

from bench.tuning import raise_nofile
from progress_service.settings import load_settings


class _Noop:
    """Stands in for a Prometheus metric: every method does nothing."""

    def __getattr__(self, name: str) -> object:
        return lambda *a, **k: self


def apply_patches(names: list[str]) -> None:
    """What-if experiments on the running server only (the repository is not changed).

    - ``no-outbox-gauge``: the per-message ``ps_ws_outbox_bytes`` gauge updates become no-ops,
      to measure what a per-frame or callback gauge would save.
    - ``no-ws-metrics``: also the per-frame message/frame counters.
    - ``hub-coalesce-<N>ms``: the hub waits N ms before each XREAD, so a read
      returns many entries instead of one (fewer reads of every room's key).
    """
    from progress_service import metrics

    for name in names:
        if name == "no-outbox-gauge":
            metrics.ws_outbox_bytes = _Noop()  # type: ignore[assignment]
        elif name == "no-ws-metrics":
            metrics.ws_outbox_bytes = _Noop()  # type: ignore[assignment]
            metrics.ws_messages_out = _Noop()  # type: ignore[assignment]
            metrics.ws_frames_out = _Noop()  # type: ignore[assignment]
        elif name.startswith("hub-coalesce-"):
            _coalesce_hub_reads(float(name.removeprefix("hub-coalesce-").removesuffix("ms")) / 1000)
        else:
            raise SystemExit(f"unknown patch {name!r}")


def _coalesce_hub_reads(delay: float) -> None:
    """Wait ``delay`` before each hub XREAD so one read carries many entries (fewer, bigger reads)."""
    from progress_service.gateway import hub

    original_init = hub.Hub.__init__

    def init(self: hub.Hub, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)
        real = self._reader.xread

        async def xread(streams: dict, count: int | None = None, block: int | None = None) -> object:
            await asyncio.sleep(delay)
            return await real(streams, count=count, block=block)

        self._reader.xread = xread  # type: ignore[method-assign]

    hub.Hub.__init__ = init  # type: ignore[method-assign]


async def _serve(host: str, port: int, ws: str) -> None:
    """The same app and Server as ``progress-service serve``, with ``ws`` passed to uvicorn."""
    from progress_service.app import create_app
    from progress_service.server import Server, make_config

    settings = load_settings()
    assert settings.redis_url, "PS_REDIS_URL must be set"
    app = create_app(settings, redis_url=settings.redis_url, run_worker=False)
    await Server(make_config(app, settings, host=host, port=port, ws=ws)).serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ws", default="auto", choices=["auto", "websockets", "websockets-sansio", "wsproto"])
    # `progress-service serve` runs `asyncio.run(Server.serve())`, which bypasses uvicorn's
    # loop factory: stock asyncio. `--loop uvloop` measures what uvloop would change.
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--patch", action="append", default=[], help="what-if experiment (see apply_patches)")
    args = parser.parse_args()
    apply_patches(args.patch)
    raise_nofile()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_serve(args.host, args.port, args.ws))
    else:
        asyncio.run(_serve(args.host, args.port, args.ws))


if __name__ == "__main__":
    main()
