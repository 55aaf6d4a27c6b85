"""``progress-service audit verify|export|rotate-key`` and ``progress-service token revoke|list``.

``audit verify [--team T] [--witness PATH]`` walks the hash chain(s), checks
them against the witness's latest checkpoints and the comments against their
records, and exits 0 after printing how many records it verified, or 1 after
naming each record that does not match (``--export FILE``: an export,
offline). ``audit export --since … --format jsonl`` writes the records
created since then, oldest first, one JSON object a line, then the latest
checkpoint of each exported chain. ``audit rotate-key`` adds a new key.
``token revoke TOKEN_ID`` revokes a token, records it in the audit log and
tells the gateways (through Redis when ``PS_REDIS_URL`` is set; they also
poll the store) to close its live connections with 4403 (token revoked).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from progress_service.operator_cli import operator_actor, require_store
from progress_service.settings import Settings


def _actor(args: argparse.Namespace) -> str:
    return operator_actor(getattr(args, "actor", None))


def _engine(settings: Settings, command: str) -> Any:
    """The store's engine; exits 2 when the configured store does not exist."""
    from progress_service.store.db import create_engine  # noqa: PLC0415

    require_store(settings, command)
    return create_engine(settings.database_url)


def _key_path(args: argparse.Namespace, settings: Settings) -> Path:
    from progress_service.store.audit.keys import key_file_path  # noqa: PLC0415

    return Path(args.key_file) if getattr(args, "key_file", None) else key_file_path(settings)


def _witness(args: argparse.Namespace, settings: Settings, keys: Any) -> Any:
    """The witness's contents (``--witness`` or the configured one); None when there is none."""
    from progress_service.store.audit.witness import open_witness  # noqa: PLC0415

    given = getattr(args, "witness", None)
    witness = open_witness(settings, given)
    if witness is None:
        return None
    if given and not witness.exists():
        raise FileNotFoundError(f"no witness {witness.name}")
    return witness.read(keys)


def _report(result: Any, scope: str) -> int:
    """Print what verify found; the exit code (0 OK, 1 something is wrong)."""
    for note in result.notes:
        print(f"audit verify: note: {note}", file=sys.stderr)
    legacy = f", {result.legacy} of them legacy SHA-256 records (written before keyed records)" if result.legacy else ""
    pinned = f"; {result.checkpointed} chain(s) checked against witness checkpoints" if result.checkpointed else ""
    comments = f"; {result.comments} comment(s) match their records" if result.comments else ""
    if result.problems:
        print(f"audit verify: FAILED after {result.verified} verified record(s){legacy}:", file=sys.stderr)
        for problem in result.problems:
            print(f"  {problem.describe()}", file=sys.stderr)
        return 1
    print(f"audit verify: OK, {result.verified} record(s) verified in {scope}{legacy}{pinned}{comments}")
    return 0


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every record matches, 1 naming each record that does not."""
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store.audit import keys as audit_keys  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    keys, key_note = audit_keys.for_verify(_key_path(args, settings))
    if args.export:
        try:
            data = Path(args.export).read_bytes()
        except OSError as exc:
            print(f"audit verify: --export: {exc.strerror}: {args.export}", file=sys.stderr)
            return 2
        result = audit.verify_export(data, keys)
        if key_note:
            result.notes.append(key_note)
        return _report(result, f"the export {args.export}, {result.chains} chain(s)")
    try:
        witness = _witness(args, settings, keys)
    except Exception as exc:  # a missing file, a Redis witness that does not answer
        print(f"audit verify: witness: {exc}", file=sys.stderr)
        return 2

    async def run() -> tuple[audit.VerifyResult, bool]:
        engine = _engine(settings, "audit verify")
        try:
            await migrate(engine)
            known = True
            if args.team and args.team != audit.SYSTEM_CHAIN:
                known = await audit.team_id_for(engine, args.team) is not None
            return await audit.verify(engine, args.team, keys=keys, witness=witness), known
        finally:
            await engine.dispose()

    result, known = asyncio.run(run())
    if not known:
        print(f"audit verify: no team {args.team!r}", file=sys.stderr)
        return 2
    if key_note:
        result.notes.append(key_note)
    if witness is None:
        result.notes.append("no witness (PS_AUDIT_WITNESS=off): deleted newest records with a moved head go unnoticed")
    return _report(result, f"team {args.team}" if args.team else f"{result.chains} chain(s)")


def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    """Records since a time as JSON lines, then their chains' checkpoints, to stdout or ``--output``."""
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store.audit import keys as audit_keys  # noqa: PLC0415
    from progress_service.store.audit.export import checkpoint_lines, export_chain_ids  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    try:
        since = audit.parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"audit export: --since: {exc}", file=sys.stderr)
        return 2
    keys, _ = audit_keys.for_verify(_key_path(args, settings))
    try:
        witness = _witness(args, settings, keys)
    except Exception as exc:  # a missing file, a Redis witness that does not answer
        print(f"audit export: witness: {exc}", file=sys.stderr)
        return 2

    async def run(out: Any) -> int:
        engine = _engine(settings, "audit export")
        count = 0
        chains: set[str] = set()
        try:
            await migrate(engine)
            batch: list[audit.AuditRecord] = []
            async for rec in audit.export(engine, since=since, team=args.team):
                batch.append(rec)
                chains.add(rec.chain)
                if len(batch) >= 500:
                    out.write(audit.encode_jsonl(batch))
                    count += len(batch)
                    batch.clear()
            out.write(audit.encode_jsonl(batch))
            count += len(batch)
            if witness is not None:
                only = await export_chain_ids(engine, args.team)
                # A chain with a checkpoint but no exported record vanished or
                # lost everything since --since: its checkpoint goes along.
                wanted = chains | {c for c in witness.latest() if only is None or c == only}
                out.write(checkpoint_lines(witness, wanted))
            out.flush()
        finally:
            await engine.dispose()
        return count

    if args.output and args.output != "-":
        with open(args.output, "wb") as fh:
            count = asyncio.run(run(fh))
        print(f"audit export: {count} record(s) written to {args.output}", file=sys.stderr)
    else:
        asyncio.run(run(sys.stdout.buffer))
    return 0


def cmd_audit_rotate_key(args: argparse.Namespace, settings: Settings) -> int:
    """Add a new current audit key to the key file; older keys stay for verification."""
    from progress_service.store.audit.keys import rotate  # noqa: PLC0415
    from progress_service.errors import KeyFileError

    path = _key_path(args, settings)
    try:
        new_id, previous = rotate(path)
    except KeyFileError as exc:
        print(f"audit rotate-key: {exc}", file=sys.stderr)
        return 1
    print(f"audit rotate-key: {path}: new current key {new_id} (previous {previous} kept for verification)")
    print("audit rotate-key: restart every node (they read the key file at start); copy the file to them first")
    return 0


def cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a token by id; its live connections are closed with 4403 (token revoked)."""
    from progress_service.revocation import revoke, token_info  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    async def run() -> tuple[bool, Any]:
        engine = _engine(settings, "token revoke")
        redis = None
        try:
            await migrate(engine)
            before = await token_info(engine, args.token_id)
            if before is None:
                return False, None
            if settings.redis_url:
                from redis.asyncio import Redis  # noqa: PLC0415

                redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
            info = await revoke(engine, args.token_id, actor=_actor(args), via="cli", redis=redis)
            return before.revokedAt is None, info
        finally:
            if redis is not None:
                await redis.aclose()
            await engine.dispose()

    if len(args.token_id) > 36:
        print("token revoke: not a token id (use the id, not the token itself)", file=sys.stderr)
        return 2
    newly, info = asyncio.run(run())
    if info is None:
        print(f"token revoke: no token with id {args.token_id}", file=sys.stderr)
        return 1
    print(f"revoked token {info.id} of {info.userName}" if newly else f"token {info.id} was already revoked")
    return 0


def cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    """The tokens of a team (ids, users, labels, state; never secrets)."""
    from progress_service.revocation import list_tokens  # noqa: PLC0415
    from progress_service.store import audit  # noqa: PLC0415
    from progress_service.store.migrations import migrate  # noqa: PLC0415

    async def run() -> list[Any] | None:
        engine = _engine(settings, "token list")
        try:
            await migrate(engine)
            team_id = await audit.team_id_for(engine, args.team)
            return None if team_id is None else await list_tokens(engine, team_id)
        finally:
            await engine.dispose()

    tokens = asyncio.run(run())
    if tokens is None:
        print(f"token list: no team {args.team!r}", file=sys.stderr)
        return 1
    for t in tokens:
        state = "revoked" if t.revokedAt else "live"
        print(f"{t.id}\t{t.userName}\t{state}\t{t.label}")
    return 0


def register(subparsers: Any, token_subparsers: Any = None) -> None:
    """Add ``audit`` (and, given the token parser, ``token revoke|list``)."""
    audit = subparsers.add_parser("audit", help="verify and export the tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    key_help = "the audit key file (default: PS_AUDIT_KEY_FILE, else beside the SQLite file)"
    p = asub.add_parser(
        "verify", help="check the chains, checkpoints and comments; exit 1 naming each record that does not match"
    )
    p.add_argument("--team", default=None, help="only this team's chain (name or id; 'system' for team-less records)")
    p.add_argument("--witness", default=None, metavar="PATH", help="a copy of the witness file, or a Redis witness URL (default: PS_AUDIT_WITNESS)")
    p.add_argument("--key-file", default=None, metavar="PATH", help=key_help)
    p.add_argument("--export", default=None, metavar="FILE", help="verify this `audit export` file offline instead of the store")
    p.set_defaults(func=cmd_audit_verify)

    p = asub.add_parser("export", help="records since a time, oldest first, then their chains' latest checkpoints")
    p.add_argument("--since", default=None, help="ISO 8601 time, epoch seconds/ms, or an age like 24h (default: all)")
    p.add_argument("--format", default="jsonl", choices=["jsonl"])
    p.add_argument("--team", default=None, help="only this team's chain")
    p.add_argument("--output", "-o", default=None, help="file to write (default: stdout)")
    p.add_argument("--witness", default=None, metavar="PATH", help="the witness to take checkpoints from")
    p.add_argument("--key-file", default=None, metavar="PATH", help=key_help)
    p.set_defaults(func=cmd_audit_export)

    p = asub.add_parser("rotate-key", help="add a new current audit key (older keys keep verifying)")
    p.add_argument("--key-file", default=None, metavar="PATH", help=key_help)
    p.set_defaults(func=cmd_audit_rotate_key)

    if token_subparsers is not None:
        p = token_subparsers.add_parser("revoke", help="revoke a token by id and close its live connections (4403 token revoked)")
        p.add_argument("token_id", metavar="TOKEN_ID")
        p.add_argument("--actor", default=None, help="who revokes it, for the audit log (default: cli:<user>)")
        p.set_defaults(func=cmd_token_revoke)

        p = token_subparsers.add_parser("list", help="a team's tokens (ids and state, never secrets)")
        p.add_argument("--team", required=True)
        p.set_defaults(func=cmd_token_list)
