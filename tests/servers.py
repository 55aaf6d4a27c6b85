"""Running the real app on uvicorn inside a test's event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from progress_service.settings import Settings

if TYPE_CHECKING:
    from progress_service.services import ChatHookFactory


@contextlib.asynccontextmanager
async def run_app(
    settings: Settings, *, run_worker: bool, port: int | None = None, chat_hook: ChatHookFactory | None = None,
    ws: Any = None,
) -> AsyncIterator[tuple[str, Any]]:
    """The app on a free loopback port; yields ``(base_url, app)`` and shuts it down after.

    The app is exposed so a test can reach ``app.state.services``; ``chat_hook``
    replaces the gateway's chat hook (see ``create_app``).
    """
    from progress_service.app import create_app  # noqa: PLC0415
    from progress_service.embedded_redis import free_port  # noqa: PLC0415
    from progress_service.server import Server, make_config  # noqa: PLC0415

    port = port or free_port()
    assert settings.redis_url, "run_app needs settings.redis_url"
    app = create_app(settings, redis_url=settings.redis_url, run_worker=run_worker, chat_hook=chat_hook)
    extra = {} if ws is None else {"ws": ws}  # uvicorn's WebSocket protocol (default: the server's own)
    server = Server(make_config(app, settings, host="127.0.0.1", port=port, **extra))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(20):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("server failed to start")
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}", app
        finally:
            server.should_exit = True
        # leaving the task group waits for serve() to finish its shutdown
