"""``progress-service submit`` and ``progress-service watch``: the terminal follower.

Both talk to a running service (``--url``, else ``PS_URL``, else
http://127.0.0.1:8000) with an API token (``--token``, else ``PS_TOKEN``),
which is sent only in the ``Authorization`` header and as the WebSocket's
first message, and is never printed.

Exit codes: 0 the job succeeded; 1 it failed or was cancelled; 2 usage,
authentication or HTTP errors (with a message, never a traceback); 130
Ctrl-C, after which the job keeps running unless ``--cancel-on-exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx

from progress_service.errors import ApiError, FollowError
from progress_service.settings import Settings
from progress_service.terminal.api import HTTP_TIMEOUT, JobsApi
from progress_service.terminal.client import JobFollower
from progress_service.terminal.render import make_renderer

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def err(text: str) -> None:
    """Tell the user on stderr (stdout is for what a script reads: a job or event id)."""
    print(f"progress-service: {text}", file=sys.stderr, flush=True)


def blank(value: str, name: str) -> bool:
    """True, saying so, when the argument ``name`` is empty or only white space."""
    if value.strip():
        return False
    err(f"{name} must not be blank")
    return True


def add_target_args(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token``: which service to talk to, as whom (see :func:`target_of`)."""
    p.add_argument("--url", default=None, help=f"service base URL (default: $PS_URL, else {DEFAULT_URL})")
    # No default shown: the help must never echo a token from the environment.
    p.add_argument("--token", default=None, help="API token (default: $PS_TOKEN)")


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    add_target_args(p)
    p.add_argument(
        "--cancel-on-exit", action="store_true", help="cancel the job when interrupted with Ctrl-C (default: it keeps running)"
    )
    p.add_argument("--plain", action="store_true", help="one line per event even on a terminal")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def register(subparsers: Any, token_subparsers: Any = None) -> None:
    """Add ``submit`` and ``watch`` to the ``progress-service`` command."""
    p = subparsers.add_parser("submit", help="submit a job (and follow it with --follow)")
    p.add_argument("prompt", metavar="PROMPT", help="what Claude Code should do")
    p.add_argument("--workdir", default=None, help="working directory, relative to the service's workspace root")
    p.add_argument("--model", default=None, help="model name")
    p.add_argument("--max-turns", type=_positive_int, default=None, metavar="N", help="turn limit")
    p.add_argument("--follow", action="store_true", help="follow the job live until it ends")
    _add_connection_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("watch", help="follow a job live until it ends")
    p.add_argument("job_id", metavar="JOB_ID")
    _add_connection_args(p)
    p.set_defaults(func=cmd_watch)


@dataclass
class Target:
    """The service a command talks to, and the token it uses."""

    url: str
    token: str
    #: Set once a job id is known, so Ctrl-C can cancel it.
    job_id: str | None = None


def target_of(args: argparse.Namespace) -> Target | None:
    """The target from ``--url``/``--token`` or ``PS_URL``/``PS_TOKEN``; None (said on stderr) when unusable."""
    url = (args.url or os.environ.get("PS_URL") or DEFAULT_URL).strip().rstrip("/")
    token = (args.token or os.environ.get("PS_TOKEN") or "").strip()
    if not url.lower().startswith(("http://", "https://")):
        err(f"--url must start with http:// or https:// (got {url!r})")
        return None
    if not token:
        err("no API token: pass --token or set PS_TOKEN (create one with `progress-service token create`)")
        return None
    return Target(url=url, token=token)


async def _follow(api: JobsApi, target: Target, job_id: str, plain: bool) -> int:
    renderer = make_renderer(job_id, plain=True if plain else None)
    with renderer:
        follower = JobFollower(api=api, base_url=target.url, token=target.token, job_id=job_id, sink=renderer)
        try:
            outcome = await follower.run()
        except FollowError as exc:
            renderer.connection("offline", str(exc))
            err(str(exc))
            return EXIT_ERROR
        renderer.finish(outcome.status, outcome.ok)
    return outcome.exit_code


async def _submit(args: argparse.Namespace, target: Target) -> int:
    async with JobsApi(target.url, target.token) as api:
        snapshot = await api.submit(args.prompt, workdir=args.workdir, model=args.model, max_turns=args.max_turns)
        target.job_id = snapshot.id
        if not args.follow:
            print(snapshot.id, flush=True)
            err(f"submitted job {snapshot.id} (room {snapshot.roomId}); follow it with: progress-service watch {snapshot.id}")
            return EXIT_OK
        err(f"submitted job {snapshot.id} (room {snapshot.roomId})")
        return await _follow(api, target, snapshot.id, args.plain)


async def _watch(args: argparse.Namespace, target: Target) -> int:
    async with JobsApi(target.url, target.token) as api:
        # An HTTP read first: a bad token or unknown job gets a precise
        # message (401 / 404) instead of a refused WebSocket.
        snapshot = await api.get_job(args.job_id)
        target.job_id = snapshot.id
        return await _follow(api, target, snapshot.id, args.plain)


def _cancel(target: Target) -> None:
    """``POST /api/jobs/{id}/cancel`` after Ctrl-C (plain httpx: the event loop is gone)."""
    try:
        response = httpx.post(
            f"{target.url}/api/jobs/{target.job_id}/cancel",
            headers={"Authorization": f"Bearer {target.token}"},
            timeout=HTTP_TIMEOUT,
        )
    except httpx.HTTPError as exc:
        err(f"could not cancel job {target.job_id}: {type(exc).__name__}")
        return
    if response.status_code < 400:
        err(f"cancel requested for job {target.job_id}")
    else:
        err(f"could not cancel job {target.job_id}: HTTP {response.status_code}")


def _run(args: argparse.Namespace, main: Callable[[argparse.Namespace, Any], Coroutine[Any, Any, int]]) -> int:
    target = target_of(args)
    if target is None:
        return EXIT_ERROR
    try:
        return asyncio.run(main(args, target))
    except ApiError as exc:
        err(str(exc))
        return EXIT_ERROR
    except FollowError as exc:
        err(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        if target.job_id is None:
            err("interrupted")
        elif args.cancel_on_exit:
            _cancel(target)
        else:
            err(f"interrupted; job {target.job_id} keeps running (progress-service watch {target.job_id})")
        return EXIT_INTERRUPTED


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """Submit a job; with ``--follow``, follow it to its end."""
    if blank(args.prompt, "PROMPT"):
        return EXIT_ERROR
    return _run(args, _submit)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Follow a job to its end."""
    return _run(args, _watch)
