"""Comments, audit log and token revocation, plugged into the app.

``app.py`` calls :func:`install` (hooks into ``services.extras``),
:func:`handlers` (HTTP routes) and runs :func:`run` in its lifespan task
group (the audit writer and the revocation watcher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from progress_service.services import Services


def install(services: Services) -> None:
    """Put the hooks where the gateway and the HTTP API look for them."""
    from progress_service.comments import Comments  # noqa: PLC0415
    from progress_service.revocation import RevocationWatcher  # noqa: PLC0415
    from progress_service.store.audit import Audit  # noqa: PLC0415

    services.extras["audit"] = Audit(services.engine)
    services.extras["comments"] = Comments.from_services(services)
    services.extras["revocations"] = RevocationWatcher(services)


def handlers() -> list:
    """Route handlers: comments, audit log, tokens."""
    from progress_service.api.audit import AuditController, TokensController  # noqa: PLC0415
    from progress_service.api.comments import CommentsController  # noqa: PLC0415

    return [CommentsController, AuditController, TokensController]


async def run(services: Services) -> None:
    """Background tasks of the extensions, until cancelled (the audit writer flushes on the way out)."""
    async with anyio.create_task_group() as tg:
        audit = services.extras.get("audit")
        if audit is not None:
            tg.start_soon(audit.run)
        watcher = services.extras.get("revocations")
        if watcher is not None:
            tg.start_soon(watcher.run)
