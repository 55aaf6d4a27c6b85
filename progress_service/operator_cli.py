"""What every operator command shares: which store it may open, and who ran it.

Commands that read the store (``token create|list|revoke``, ``audit
verify|export``) must not invent one: run from the wrong folder, SQLite
would silently create an empty ``progress.db`` and the command would report
"0 records, OK" about it. :func:`require_store` refuses instead (exit 2,
naming the URL and the file it looked for). ``migrate`` and ``dev`` create
the store on purpose and do not call it.

:func:`operator_actor` is the audit actor of every such command: the
operator who ran it (``cli:<os user>``), never the user a token is for
(that is the record's subject, in its detail).
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from progress_service.settings import Settings
from progress_service.store.db import normalize_url

#: Exit status of a command refused before it touched anything.
USAGE_EXIT = 2


def safe_url(url: str) -> str:
    """The store URL as it may be printed: with any password masked."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable PS_DATABASE_URL>"


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite store URL (absolute), or None (not SQLite, or in memory)."""
    try:
        parsed = make_url(normalize_url(url))
    except ArgumentError:
        return None
    if not parsed.get_backend_name() == "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def require_store(settings: Settings, command: str) -> None:
    """Exit 2 naming the URL unless the configured store exists (SQLite: its file)."""
    path = sqlite_path(settings.database_url)
    if path is None or path.is_file():
        return
    print(
        f"progress-service {command}: no store at {safe_url(settings.database_url)} ({path} does not exist); "
        "set PS_DATABASE_URL to the service's store, or create one with `progress-service migrate`",
        file=sys.stderr,
    )
    raise SystemExit(USAGE_EXIT)


def operator_actor(explicit: str | None = None) -> str:
    """The audit actor of an operator command: ``explicit`` (``--actor``), else ``cli:<os user>``."""
    if explicit:
        return explicit
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment (e.g. a bare container uid)
        return "cli"


def missing_database(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is PostgreSQL's "database does not exist" (3D000)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if getattr(cur, "sqlstate", None) == "3D000":
            return True
        todo.extend(e for e in (cur.__cause__, cur.__context__, getattr(cur, "orig", None)) if isinstance(e, BaseException))
    return False
