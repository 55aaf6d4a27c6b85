"""The ``progress-service`` command.

``dev`` runs everything in one process for a developer; ``serve`` and
``worker`` are the two halves of the scaled setup; ``token`` and ``migrate``
administer the store. Other modules add subcommands through ``register``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from progress_service.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

#: Modules that add subcommands: each has ``register(subparsers)``.
PLUGIN_MODULES: tuple[str, ...] = ("progress_service.terminal.commands", "progress_service.terminal.steer", "progress_service.audit_cli", "progress_service.hooks.install")

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings() -> Settings:
    try:
        return load_settings()
    except ValueError as exc:
        print(f"progress-service: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@contextlib.contextmanager
def _redis_url(settings: Settings, *, allow_embedded: bool) -> Iterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    if not allow_embedded:
        print("progress-service: set PS_REDIS_URL (only `dev` starts an embedded Redis)", file=sys.stderr)
        raise SystemExit(2)
    from progress_service.embedded_redis import dev_data_dir, embedded_redis  # noqa: PLC0415

    # Its data (jobs queued and running, their streams) lives beside the
    # SQLite file, so a restart of dev picks up where it stopped.
    data_dir = dev_data_dir(settings.database_url)
    with embedded_redis(data_dir=data_dir) as url:
        print(f"progress-service: embedded Redis at {url}, data in {data_dir} (set PS_REDIS_URL to use your own)", flush=True)
        yield url


async def _serve(settings: Settings, host: str, port: int, redis_url: str, *, run_worker: bool) -> None:
    from progress_service.app import create_app  # noqa: PLC0415 - keep `token` fast
    from progress_service.server import Server, make_config  # noqa: PLC0415

    app = create_app(settings, redis_url=redis_url, run_worker=run_worker)
    await Server(make_config(app, settings, host=host, port=port)).serve()


#: The label of the admin token ``dev`` prints (one live at a time).
DEV_TOKEN_LABEL = "dev session"


async def _dev_token(settings: Settings) -> str:
    """A fresh sign-in token for this ``dev`` run; the previous runs' ones are revoked.

    Only a hash of a token is stored, so an earlier one cannot be printed
    again; revoking it keeps one live ``dev`` admin token instead of one per start.
    """
    from progress_service.operator_cli import operator_actor  # noqa: PLC0415
    from progress_service.revocation import list_tokens, revoke  # noqa: PLC0415
    from progress_service.store.audit import team_id_for  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.identity import create_token  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    engine = create_engine(settings.database_url)
    try:
        await migrate(engine)
        actor = operator_actor()
        team_id = await team_id_for(engine, "dev")
        if team_id is not None:
            for old in await list_tokens(engine, team_id, include_revoked=False):
                if old.label == DEV_TOKEN_LABEL and old.userName == "dev":
                    await revoke(engine, old.id, actor=actor, via="dev")
        token, token_id = await create_token(engine, user="dev", team="dev", role="admin", label=DEV_TOKEN_LABEL)
        await _audit_token(engine, "token.create", "dev", "dev", token_id, actor=actor)
        return token
    finally:
        await engine.dispose()


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """App, gateway and an in-process worker; embedded Redis when none is configured."""
    from progress_service.app import claude_is_available  # noqa: PLC0415

    settings = load_settings(host=args.host, port=args.port)
    _setup_logging(settings.log_level)
    settings.workspace_path.mkdir(parents=True, exist_ok=True)
    token = asyncio.run(_dev_token(settings))
    with _redis_url(settings, allow_embedded=True) as url:
        base = settings.public_url or f"http://{args.host}:{args.port}"
        if not claude_is_available(settings):
            print(
                "progress-service: no Claude Code binary found (PS_CLAUDE_BIN or `claude` on PATH): "
                "jobs run the REPLAY program and are marked demo",
                flush=True,
            )
        print(f"progress-service: store {settings.database_url}; workspace {settings.workspace_path}", flush=True)
        print("progress-service: open this link (the token is in the fragment, never sent to a server):", flush=True)
        print(f"\n    {base}/#token={token}\n", flush=True)
        print(f"progress-service: API token for curl: export PS_TOKEN={token}", flush=True)
        asyncio.run(_serve(settings, args.host, args.port, url, run_worker=True))
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """The app and gateway only (scaled setup; needs PS_REDIS_URL)."""
    _setup_logging(settings.log_level)
    with _redis_url(settings, allow_embedded=False) as url:
        asyncio.run(_serve(settings, args.host or settings.host, args.port or settings.port, url, run_worker=False))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """An arq worker only (scaled setup; needs PS_REDIS_URL)."""
    _setup_logging(settings.log_level)
    from worker.settings import build_worker  # noqa: PLC0415

    with _redis_url(settings, allow_embedded=False) as url:
        # arq's own signal handling lets SIGTERM finish or hand back running jobs.
        worker = build_worker(settings, redis_url=url, handle_signals=True)
        worker.run()
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Bring the SQL store's schema up to date."""
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    async def run() -> list[str]:
        engine = create_engine(settings.database_url)
        try:
            return await migrate(engine)
        finally:
            await engine.dispose()

    applied = asyncio.run(run())
    print("\n".join(f"applied {a}" for a in applied) if applied else "schema is up to date")
    return 0


def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    """Print a new API token, and nothing else, on stdout."""
    from progress_service.operator_cli import operator_actor, require_store  # noqa: PLC0415
    from progress_service.store.db import create_engine  # noqa: PLC0415
    from progress_service.store.identity import create_token  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    require_store(settings, "token create")

    async def run() -> str:
        engine = create_engine(settings.database_url)
        try:
            await migrate(engine)
            token, token_id = await create_token(
                engine, user=args.user, team=args.team, role=args.role, label=args.label, expires_in=args.expires_in
            )
            await _audit_token(engine, "token.create", args.team, args.user, token_id, actor=operator_actor(args.actor))
            return token
        finally:
            await engine.dispose()

    print(asyncio.run(run()))
    return 0


async def _audit_token(engine: AsyncEngine, action: str, team: str, user: str, token_id: str, *, actor: str) -> None:
    """Record token administration in the audit log: ``actor`` did it, ``user`` is whom the token is for."""
    from progress_service.store import audit  # noqa: PLC0415

    await audit.record_for_team_name(
        engine, action=action, team_name=team, actor=actor, detail={"tokenId": token_id, "user": user}
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    # Plain text: argparse prints the description as it is (the docstring is RST).
    parser = argparse.ArgumentParser(prog="progress-service", description="Run and use the progress service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="run app + worker locally (embedded Redis when PS_REDIS_URL is unset)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("serve", help="run the app and gateway (needs PS_REDIS_URL)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run an arq worker (needs PS_REDIS_URL)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="apply pending SQL store migrations")
    p.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="manage API tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("create", help="create a token; prints only the token")
    p.add_argument("--user", required=True)
    p.add_argument("--team", required=True)
    p.add_argument("--role", required=True, choices=["viewer", "reviewer", "submitter", "admin", "reporter"])
    p.add_argument("--label", default="")
    p.add_argument("--expires-in", type=int, default=None, metavar="SECONDS")
    p.add_argument("--actor", default=None, help="who creates it, for the audit log (default: cli:<user>)")
    p.set_defaults(func=cmd_token_create)

    for name in PLUGIN_MODULES:
        importlib.import_module(name).register(sub, token_subparsers=tsub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``progress-service`` console script."""
    args = build_parser().parse_args(argv)
    settings = _settings()
    try:
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from progress_service import outage  # noqa: PLC0415
        from progress_service.operator_cli import missing_database, safe_url  # noqa: PLC0415

        if missing_database(exc):
            print(f"progress-service {args.command}: no store at {safe_url(settings.database_url)} (the database does not exist)", file=sys.stderr)
            return 2
        dependency = outage.classify(exc)
        if dependency is None:
            raise
        # One line naming what could not be reached, not a driver traceback.
        where = safe_url(settings.database_url) if dependency == "store" else "Redis"
        command = " ".join(str(v) for v in (args.command, getattr(args, "token_command", None), getattr(args, "audit_command", None)) if v)
        print(f"progress-service {command}: {outage.describe(dependency).split(';')[0]} ({where}): {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
