"""One typed settings object, read from ``PS_*`` environment variables.

Every tunable of the service lives here so operators find them in one place
(the README's configuration table mirrors this class). Field ``foo_bar`` is
read from ``PS_FOO_BAR``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from progress_service.keys import QUEUE_NAME

PREFIX = "PS_"


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Runtime configuration of the app, the gateway and the worker."""

    # --- where things are -------------------------------------------------
    #: Redis URL. Unset: ``progress-service dev`` starts an embedded Redis.
    redis_url: str | None = None
    #: ``PS_REDIS_URL`` names any node of a Redis Cluster (events, snapshots,
    #: presence, tickets, revocations, cancel flags are sharded by job).
    redis_cluster: bool = False
    #: Redis of the arq job queue (arq cannot shard: never a cluster).
    #: Unset: ``PS_REDIS_URL`` (required with ``PS_REDIS_CLUSTER``).
    queue_redis_url: str | None = None
    #: SQLAlchemy async URL of the SQL store.
    database_url: str = "sqlite+aiosqlite:///progress.db"
    #: Claude Code binary. Unset: ``claude`` on PATH, else the replay program.
    claude_bin: str | None = None
    #: Jobs may only run in directories inside this one.
    workspace_root: str = "workspace"
    #: Public base URL of the service, used in printed links.
    public_url: str | None = None
    #: Extra allowed browser origins for /ws and CORS (comma separated).
    allowed_origins: tuple[str, ...] = ()

    # --- HTTP -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    #: Requests per minute per caller on the HTTP API, over all nodes (counted
    #: in Redis): per user when authenticated, else per client address.
    http_rate_limit: int = 600
    #: Reverse proxies / load balancers (IPs or CIDRs, comma separated) whose
    #: ``X-Forwarded-For`` names the client; from anyone else it is ignored.
    trusted_proxies: tuple[str, ...] = ()
    #: Seconds between /readyz's background dependency checks (it answers
    #: the last result; 503 once the probe is overdue or the node drains).
    ready_probe_interval: float = 1.0
    #: Seconds a stopping ``serve`` keeps serving with /readyz at 503 before
    #: it closes connections, so load balancers take it out first (0: none).
    drain_seconds: float = 0.0
    #: Max page size of list endpoints.
    page_max: int = 200
    #: Lifetime of a single-use WebSocket ticket (seconds).
    ticket_ttl: int = 60
    #: Lifetime of a web page's sign-in cookie session (seconds; never past the token's expiry).
    session_ttl: int = 7 * 86400

    # --- jobs and worker --------------------------------------------------
    #: Default and maximum per-job timeout (seconds).
    job_timeout: int = 1800
    job_timeout_max: int = 4 * 3600
    #: The arq queue the API fills and the workers drain (one per deployment).
    queue_name: str = QUEUE_NAME
    #: Jobs one worker process runs at once.
    worker_concurrency: int = 4
    #: How many times a job whose worker died is started again.
    job_max_tries: int = 2
    #: Seconds between SIGINT and SIGTERM (up to twice that while the CLI is
    #: still printing its last lines), and between SIGTERM and SIGKILL.
    cancel_grace: float = 5.0
    #: Seconds a running job's lease lives without a refresh; a worker that
    #: stops refreshing it (killed, frozen) is declared lost by the sweeper.
    lease_ttl: float = 15.0
    #: Seconds a missing lease must stay missing before the sweeper believes
    #: it: after Redis restarted (empty, or after an outage longer than the
    #: lease) a live worker re-creates its lease within about a second.
    lease_grace: float = 5.0
    #: Archived events a job's stream keeps in Redis (the publisher trims
    #: only below what the archive holds: ``streams.trim_archived``).
    events_maxlen: int = 10_000
    #: Seconds an entry stays in Redis at least, archived or not: a gateway
    #: whose stream reader lags behind by less than this misses nothing live.
    events_keep_seconds: float = 10.0
    #: Seconds a finished job's stream and snapshot are kept in Redis.
    events_ttl: int = 7 * 24 * 3600
    #: Days a finished job's events are kept in the SQL archive (0: forever).
    history_days: int = 90
    #: Events a job's publisher keeps while Redis (or, as many, the store)
    #: is unavailable; past that the job's output waits.
    publish_buffer: int = 10_000
    #: Max prompt length accepted by the API (characters).
    prompt_max_chars: int = 100_000
    #: Replay program: speed factor and forced transcript name.
    replay_speed: float = 1.0
    replay_transcript: str | None = None
    #: The worker runs in a throwaway sandbox (container, VM): jobs asking for
    #: ``bypassPermissions`` get ``IS_SANDBOX=1``, which the CLI needs as root.
    claude_sandbox: bool = False
    #: Debugging: keep each attempt's raw CLI stdout as ``<dir>/<job>.<attempt>.jsonl``.
    claude_stdout_dir: str | None = None

    # --- WebSocket gateway ------------------------------------------------
    ws_max_frame_bytes: int = 8192
    #: Deepest nesting of arrays/objects a client frame may have (checked before decoding).
    ws_max_json_depth: int = 16
    ws_max_text_chars: int = 1000
    ws_auth_timeout: float = 5.0
    ws_max_rooms: int = 32
    ws_chat_rate: float = 5.0
    ws_chat_burst: int = 10
    ws_error_budget: int = 20
    #: Authenticated WebSocket connections one user may hold, over all gateway nodes.
    ws_max_connections_per_user: int = 50
    #: Seconds a connection keeps counting against that cap without its node's
    #: refresh (every third of it): a killed node's connections stop counting after this.
    ws_connection_ttl: float = 30.0
    ws_outbox_bytes: int = 1 << 20
    ws_heartbeat: float = 25.0
    ws_ping_interval: float = 25.0
    ws_ping_timeout: float = 20.0
    ws_send_timeout: float = 10.0
    #: Seconds a batching connection's sender waits after its first ready
    #: message, so everything ready within it leaves in one frame (0: no wait).
    ws_write_window: float = 0.002
    ws_per_message_deflate: bool = False
    #: A connection must re-send ``auth`` within this many seconds.
    ws_credential_ttl: int = 3600
    presence_grace: float = 10.0
    #: Seconds a gateway node's presence heartbeat stays valid (renewed every
    #: third of it): a node silent this long is dead and its users are
    #: announced left.
    presence_node_ttl: float = 30.0
    #: Seconds the store may take to durably write a comment before the
    #: client is told ``unavailable``.
    store_timeout: float = 5.0
    #: Seconds an unanswered permission prompt (``permissionMode: "ask"``)
    #: waits before it is denied.
    permission_timeout: float = 300.0
    #: Seconds an instruction's sender waits for the CLI's echo before it is
    #: told ``timeout`` (HTTP: 202 with state ``queued``); a retry with the
    #: same request id waits again, without a second copy.
    steer_ack_timeout: float = 30.0
    #: Store reads the gateway runs at once for joins and auths (the rest queue).
    ws_store_slots: int = 8
    #: Seconds a join or auth waits in that queue before ``unavailable``
    #: (a reconnect storm waits; only a store that is down refuses).
    ws_store_wait: float = 30.0

    # --- audit log --------------------------------------------------------
    #: The audit key file (secrets records and checkpoints are keyed with).
    #: Unset: beside the SQLite file, else ``progress-audit.key`` here.
    audit_key_file: str | None = None
    #: Where signed checkpoints of the audit chains go: an append-only JSONL
    #: file, or a Redis stream (``redis://host:port/db#stream``). Unset: a
    #: file beside the key file (``…-witness.jsonl``); ``off``: none.
    audit_witness: str | None = None
    #: Seconds between checkpoints while records are appended.
    audit_checkpoint_seconds: float = 5.0

    # --- Claude Code hooks (POST /api/hooks/claude-code) --------------------
    #: Hook posts per second per reporter token (per app process), and the burst saved up.
    hook_rate: float = 50.0
    hook_burst: int = 500
    #: Largest hook body (413 above) and deepest nesting of its tool input (400 above).
    hook_max_body_bytes: int = 1 << 20
    hook_max_depth: int = 64
    #: Hooks waiting for the ingest task per process (503 when full).
    hook_queue: int = 10_000
    #: New sessions one reporter token may start per hour (429 above).
    hook_max_sessions_per_hour: int = 100
    #: Hooks applied per session; later ones are ignored (one log event says so).
    hook_max_events_per_session: int = 20_000

    def queue_url(self, redis_url: str) -> str:
        """The queue's Redis URL (see ``queue_redis_url``); ``redis_url`` is the data Redis in use."""
        if self.queue_redis_url:
            return self.queue_redis_url
        if self.redis_cluster:
            raise ValueError("PS_QUEUE_REDIS_URL: required with PS_REDIS_CLUSTER=true (the arq queue cannot run on a cluster)")
        return redis_url

    @property
    def workspace_path(self) -> Path:
        """The workspace root as an absolute, resolved path."""
        return Path(self.workspace_root).expanduser().resolve()

    @property
    def is_sqlite(self) -> bool:
        """True when the SQL store is an SQLite file."""
        return self.database_url.startswith("sqlite")


_FIELDS = Settings.__struct_fields__


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build :class:`Settings` from ``PS_*`` variables, then apply overrides.

    Raises :class:`ValueError` naming the variable when one does not parse.
    """
    source = os.environ if env is None else env
    raw: dict[str, object] = {}
    for field in _FIELDS:
        value = source.get(PREFIX + field.upper())
        if value is None or value == "":
            continue
        if field == "allowed_origins":
            raw[field] = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        elif field == "trusted_proxies":
            raw[field] = tuple(o.strip() for o in value.split(",") if o.strip())
        else:
            raw[field] = value
    raw.update(overrides)
    proxies = raw.get("trusted_proxies") or ()
    for proxy in proxies if isinstance(proxies, (tuple, list)) else (proxies,):
        try:
            ipaddress.ip_network(str(proxy), strict=False)
        except ValueError:
            raise ValueError(f"{PREFIX}TRUSTED_PROXIES: {proxy!r} is not an IP address or CIDR") from None
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        # "Expected `int`, got `str` - at `$.port`" -> name the variable.
        msg = str(exc)
        if "`$." in msg:
            field = msg.rsplit("`$.", 1)[1].rstrip("`")
            msg = f"{PREFIX}{field.upper()}: {msg.split(' - at ')[0]}"
        raise ValueError(msg) from None
    if settings.redis_cluster and not settings.queue_redis_url:
        # Refused at start, not at the first enqueue: arq cannot run on a cluster.
        raise ValueError(
            f"{PREFIX}QUEUE_REDIS_URL: required with {PREFIX}REDIS_CLUSTER=true "
            "(the arq job queue needs a plain Redis or Sentinel; arq cannot shard)"
        )
    return settings
