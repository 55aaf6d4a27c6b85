"""The HTTP API's rate limit, kept in Redis so it holds across app nodes.

Who is counted:

- an authenticated caller by its user id, however many tokens, cookies or
  nodes it uses. The id comes from what this process already knows (the
  principal a bearer token or session cookie resolved to on an earlier
  request, or the gateway's principal cache): the limiter never reads the
  store itself, so it adds no SQL round trip per request. A credential this
  process has not seen yet counts against its client address until the
  request's own authentication resolved it;
- anyone else by client address: the TCP peer, or the first address in
  ``X-Forwarded-For`` that is not one of ``PS_TRUSTED_PROXIES`` when the
  peer is one of them (so a client cannot pick its own bucket by sending
  the header).

The count is a sliding window (the current and previous minute, weighted)
in one Redis hash per caller, updated by one Lua script with Redis's own
clock: atomic across nodes, one round trip per request. A refusal is a 429
saying what was exceeded, with ``Retry-After``. When Redis cannot be asked
the request goes on (its handler answers 503 if it needs Redis itself).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from redis.exceptions import RedisError

from progress_service import outage
from progress_service.auth import PrincipalCache, RequestCredential, request_credential
from progress_service.keys import rate_limit_key
from progress_service.state import started_services
from progress_service.store.identity import hash_token

if TYPE_CHECKING:
    from litestar import Request
    from litestar.connection import ASGIConnection
    from litestar.types import Message, Receive, Scope, Send
    from redis.asyncio import Redis

    from progress_service.settings import Settings
    from progress_service.store.identity import Principal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds a credential -> user id mapping is trusted (like the principal cache).
KNOWN_TTL = 30.0
#: Credentials remembered at most (the oldest half is dropped past it).
KNOWN_MAX = 50_000


# KEYS: the caller's hash. ARGV: limit, window ms.
# -> {1, remaining, reset ms} admitted, or {0, retry-after ms, 0} refused.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local idx = math.floor(now / win)
local h = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w = tonumber(h[1]) or -2
local c = tonumber(h[2]) or 0
local p = tonumber(h[3]) or 0
if w == idx - 1 then p = c; c = 0 elseif w ~= idx then p = 0; c = 0 end
local start = idx * win
local into = (now - start) / win
local est = p * (1 - into) + c
if est + 1 > limit then
  local at
  if c + 1 > limit then
    -- next window: the previous one (this one's c) must weigh little enough
    at = start + win + win * (1 - (limit - 1) / c)
  else
    at = start + win * (1 - (limit - 1 - c) / p)
  end
  return {0, math.max(1, math.ceil(at - now)), 0}
end
redis.call('HSET', KEYS[1], 'w', idx, 'c', c + 1, 'p', p)
redis.call('PEXPIRE', KEYS[1], 2 * win)
return {1, math.floor(limit - est - 1), start + win - now}
"""


def parse_trusted_proxies(values: Iterable[str]) -> tuple[Network, ...]:
    """``PS_TRUSTED_PROXIES`` entries (IPs or CIDRs) as networks; ValueError naming a bad one."""
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"PS_TRUSTED_PROXIES: {value!r} is not an IP address or CIDR") from None
    return tuple(out)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address: ``peer``, or from ``X-Forwarded-For`` when ``peer`` is a trusted proxy.

    The header is read right to left (each proxy appends the address it saw),
    skipping trusted proxies: the first other address is the client. A
    client's own leftmost entries are never believed over what a trusted
    proxy saw.
    """
    address = peer or "unknown"
    if not proxies or peer is None or not forwarded_for or not _trusted(peer, proxies):
        return address
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, proxies):
            break
    return address


def _digest(credential: RequestCredential) -> str:
    kind = "t" if credential.kind == "token" else "c"
    return kind + ":" + hashlib.sha256(credential.secret.encode()).hexdigest()[:32]


class HttpLimiter:
    """The deployment-wide HTTP rate limit: who a request counts as, and the Redis count.

    ``principals`` is the process's principal cache (shared with the
    gateway and the hook route): a bearer token it holds counts as its user
    with no store read. ``Services.http_limit`` is the app's one instance.
    """

    def __init__(
        self,
        settings: Settings,
        principals: PrincipalCache | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = settings.http_rate_limit
        self.principals = principals
        self.window_ms = 60_000
        self.namespace = settings.queue_name
        self.proxies = parse_trusted_proxies(settings.trusted_proxies)
        self._clock = clock
        #: credential digest -> (user id, monotonic time until which it is trusted)
        self._known: dict[str, tuple[str, float]] = {}
        #: After a failed count, requests are not counted until then (monotonic):
        #: each would otherwise wait out the client's retries on a Redis that is down.
        self.paused_until = 0.0

    # ------------------------------------------------ who a request counts as

    @staticmethod
    def credential(request: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        """A digest of the request's credential (bearer token or session cookie), never the secret."""
        found = request_credential(request.headers, request.cookies)
        return _digest(found) if found is not None else None

    def remember(self, request: ASGIConnection[Any, Any, Any, Any], principal: Principal) -> None:
        """The request's credential resolved to ``principal``: count its later requests as that user."""
        credential = self.credential(request)
        if credential is None:
            return
        if len(self._known) >= KNOWN_MAX:
            for key in list(self._known)[: KNOWN_MAX // 2]:
                del self._known[key]
        self._known[credential] = (principal.user_id, self._clock() + KNOWN_TTL)

    def user_of(self, request: Request[Any, Any, Any]) -> str | None:
        """The user id behind the request's credential, if this process already knows it."""
        presented = request_credential(request.headers, request.cookies)
        if presented is None:
            return None
        if presented.kind == "token" and self.principals is not None:
            principal = self.principals.peek(hash_token(presented.secret))
            if principal is not None:
                return principal.user_id
        credential = _digest(presented)
        found = self._known.get(credential)
        if found is None:
            return None
        user_id, until = found
        if until <= self._clock():
            del self._known[credential]
            return None
        return user_id

    def identifier(self, request: Request[Any, Any, Any]) -> str:
        """``user:<id>`` for a known caller, else ``addr:<client address>``."""
        user_id = self.user_of(request)
        if user_id is not None:
            return "user:" + user_id
        peer = request.client.host if request.client else None
        return "addr:" + client_address(peer, request.headers.get("x-forwarded-for"), self.proxies)

    # ------------------------------------------------------------- counting

    async def hit(self, redis: Redis, identifier: str) -> tuple[bool, int, int]:
        """Count one request: ``(admitted, remaining or retry-after ms, reset ms)``."""
        ok, value, reset = await redis.eval(_HIT, 1, rate_limit_key(self.namespace, identifier), self.limit, self.window_ms)
        return bool(ok), int(value), int(reset)


class RedisRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's rate-limit middleware counting in Redis (see the module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["litestar_app"]
        services = started_services(app)
        if services is None:  # not started yet (or a test app without a lifespan)
            await self.app(scope, receive, send)
            return
        limiter = services.http_limit
        request: Request[Any, Any, Any] = app.request_class(scope)
        identifier = limiter.identifier(request)
        if limiter.paused_until > time.monotonic():
            await self.app(scope, receive, send)
            return
        try:
            ok, value, reset = await limiter.hit(services.redis, identifier)
        except (RedisError, OSError) as exc:
            outage.warn("redis", "HTTP rate limit (not counted)", exc)
            limiter.paused_until = time.monotonic() + outage.RETRY_AFTER_SECONDS
            await self.app(scope, receive, send)
            return
        if not ok:
            retry = max(1, math.ceil(value / 1000))
            who = "this user" if identifier.startswith("user:") else "this client address"
            raise TooManyRequestsException(
                f"rate limited: more than {limiter.limit} requests per minute from {who} "
                f"(PS_HTTP_RATE_LIMIT, counted over every node); retry in {retry} s",
                headers={
                    "Retry-After": str(retry),
                    "RateLimit-Limit": str(limiter.limit),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(retry),
                },
            )
        headers = {
            "RateLimit-Limit": str(limiter.limit),
            "RateLimit-Remaining": str(max(0, value)),
            "RateLimit-Reset": str(max(0, math.ceil(reset / 1000))),
        }

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                out = MutableScopeHeaders(message)
                for k, v in headers.items():
                    out[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


def http_rate_limit_config(settings: Settings, *, exclude: list[str]) -> RateLimitConfig:
    """Litestar's :class:`RateLimitConfig` with :class:`RedisRateLimitMiddleware`.

    The middleware counts with the running app's ``Services.http_limit``
    (built by ``build_services``); Litestar's own store and identifier are unused.
    """
    return RateLimitConfig(
        rate_limit=("minute", settings.http_rate_limit),
        exclude=exclude,
        middleware_class=RedisRateLimitMiddleware,
    )
