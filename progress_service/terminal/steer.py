"""``progress-service steer`` and ``progress-service decide``: steer a running job from the terminal.

``steer JOB_ID TEXT`` sends an instruction to the job's running Claude Code
and prints the id of its ``instruction`` event once the CLI took it;
``decide JOB_ID PERMISSION_ID allow|deny`` answers a permission prompt
(``watch`` prints the exact command with each one). Both retry a lost
connection with the same ``Idempotency-Key``, so nothing is delivered twice.

Exit codes: 0 delivered / answered; 1 refused (not running, already
decided, rejected) or still queued when the wait ran out; 2 usage,
authentication or HTTP errors.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

from progress_service.errors import ApiError
from progress_service.settings import Settings
from progress_service.terminal.api import JobsApi
from progress_service.terminal.commands import (
    EXIT_ERROR,
    EXIT_JOB_FAILED,
    EXIT_OK,
    Target,
    add_target_args,
    blank,
    err,
    target_of,
)

#: Connection attempts per command (the key makes retries safe).
ATTEMPTS = 3


def register(subparsers: Any, token_subparsers: Any = None) -> None:
    """Add ``steer`` and ``decide`` to the ``progress-service`` command."""
    p = subparsers.add_parser("steer", help="send an instruction to a running job's Claude Code")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("text", metavar="TEXT", help="what Claude should do now")
    add_target_args(p)
    p.set_defaults(func=cmd_steer)

    p = subparsers.add_parser("decide", help="allow or deny a pending permission prompt of a job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("permission_id", metavar="PERMISSION_ID")
    p.add_argument("answer", choices=("allow", "deny"))
    p.add_argument("--message", default=None, help="told to Claude with the answer (e.g. why it was denied)")
    add_target_args(p)
    p.set_defaults(func=cmd_decide)


async def _send(target: Target, call: Any) -> int:
    key = uuid.uuid4().hex
    async with JobsApi(target.url, target.token) as api:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                outcome = await call(api, key)
                break
            except ApiError as exc:
                if (exc.status is not None and exc.status != 503) or attempt == ATTEMPTS:
                    err(str(exc))
                    return EXIT_JOB_FAILED if exc.status in (409,) else EXIT_ERROR
                await asyncio.sleep(attempt)
    if outcome.get("state") == "queued":
        err("not delivered yet (the CLI has not taken it); run the command again later to learn the outcome")
        return EXIT_JOB_FAILED
    print(outcome.get("eventId") or "", flush=True)
    err(f"{outcome.get('state')} (event {outcome.get('eventId')})")
    return EXIT_OK


def cmd_steer(args: argparse.Namespace, settings: Settings) -> int:
    """Send an instruction; exit 0 once the CLI echoed it."""
    if blank(args.text, "TEXT"):
        return EXIT_ERROR
    target = target_of(args)
    if target is None:
        return EXIT_ERROR
    return asyncio.run(_send(target, lambda api, key: api.instruct(args.job_id, args.text, key)))


def cmd_decide(args: argparse.Namespace, settings: Settings) -> int:
    """Answer a permission prompt; exit 0 once the CLI got the answer."""
    target = target_of(args)
    if target is None:
        return EXIT_ERROR
    allow = args.answer == "allow"
    return asyncio.run(_send(target, lambda api, key: api.decide(args.job_id, args.permission_id, allow, args.message, key)))
