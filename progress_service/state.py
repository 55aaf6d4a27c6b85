"""Where a running app keeps its :class:`~progress_service.services.Services` (``app.state``).

For the few places outside Litestar's dependency injection: the ASGI layers
in front of the app (``GatewayFront``, ``HookFront``), the handshake guard,
the server's shutdown order. Handlers get components through DI instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from litestar import Litestar

if TYPE_CHECKING:
    from progress_service.services import Services

_KEY = "services"


def unwrap(app: object) -> Litestar:
    """The Litestar app inside the ASGI layers around it (each keeps the next in ``.app``)."""
    seen = 0
    while not isinstance(app, Litestar) and hasattr(app, "app") and seen < 10:
        app = app.app
        seen += 1
    if not isinstance(app, Litestar):
        raise TypeError(f"not a Litestar app: {type(app).__name__}")
    return app


def started_services(app: Litestar) -> Services | None:
    """The app's components once its lifespan has built them, else None."""
    return cast("Services | None", app.state.get(_KEY))


def services_of(app: Litestar) -> Services:
    """The app's components (the lifespan has started: inside a request)."""
    services = started_services(app)
    if services is None:
        raise RuntimeError("the app's lifespan has not started")
    return services


def set_services(app: Litestar, services: Services | None) -> None:
    """Publish (or, with None, withdraw) the components built by the lifespan."""
    if services is None:
        app.state.pop(_KEY, None)
    else:
        app.state[_KEY] = services
