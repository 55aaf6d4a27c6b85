"""Container health checks: ``python -m progress_service.healthcheck app|worker``.

The image's ``HEALTHCHECK`` runs the ``app`` check (``/readyz`` of the
local ``serve``); the compose file gives the worker the ``worker`` check:
Redis answers and the Claude Code binary the worker would run starts and
names its version (so an image whose CLI went missing is unhealthy, not a
worker that silently runs the replay demo). Exit status 0 is healthy, 1 is
not; one line on stdout says why. No credential is printed or checked
against the API (that would spend tokens every few seconds).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from progress_service.settings import load_settings


def check_app() -> str:
    """``/readyz`` of the app in this container answers 200."""
    settings = load_settings()
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.port}/readyz", timeout=3) as resp:  # noqa: S310 - loopback
        if resp.status != 200:
            raise RuntimeError(f"/readyz answered {resp.status}")
    return "app ready"


def check_worker() -> str:
    """Redis answers PING and the worker's Claude Code binary runs."""
    from redis import Redis  # noqa: PLC0415

    from worker.claude import resolve_binary  # noqa: PLC0415

    settings = load_settings()
    if not settings.redis_url:
        raise RuntimeError("PS_REDIS_URL is not set")
    # The queue's Redis (PS_QUEUE_REDIS_URL) is the one the worker polls; with a
    # cluster the job data is elsewhere and the cluster URL is pinged too.
    for url in dict.fromkeys([settings.queue_url(settings.redis_url), settings.redis_url]):
        client = Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    argv, demo = resolve_binary(settings)
    if demo:
        raise RuntimeError("no Claude Code binary (PS_CLAUDE_BIN or claude on PATH): jobs would be demos")
    version = subprocess.run([argv[0], "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    if not version:
        raise RuntimeError(f"{argv[0]} --version printed nothing")
    return f"worker ready: redis answers, {version}"


def main(argv: list[str] | None = None) -> int:
    """Run one check; 0 healthy, 1 not, 2 usage."""
    args = sys.argv[1:] if argv is None else argv
    checks = {"app": check_app, "worker": check_worker}
    if len(args) != 1 or args[0] not in checks:
        print("usage: python -m progress_service.healthcheck app|worker", file=sys.stderr)
        return 2
    try:
        print(checks[args[0]]())
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
