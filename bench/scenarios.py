"""The five benchmark scenarios of issue 6, each in a full and a ``quick`` size.

Every scenario starts its own :class:`~bench.service.Service` (private Redis,
fresh store, the app as a subprocess), drives it from separate load-generator
processes and returns one flat result dict (one JSON line).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.control import MEASURE, WARMUP
from bench.loadgen import BACKOFF_BASE, BACKOFF_CAP, ClientSpec, WorkerConfig
from bench.orchestra import BenchError, Orchestra, log, split
from bench.publisher import PublisherConfig
from bench.service import Service

#: Connections per API token (the default limit per user is 50; stay under it, as real users would).
CLIENTS_PER_TOKEN = 25
#: Load-generator processes unless ``--procs`` says otherwise.
DEFAULT_PROCS = 2


@dataclass
class Options:
    """Command-line options every scenario sees."""

    quick: bool = False
    ws_impl: str | None = None
    loop: str = "asyncio"
    pg_admin: str | None = None
    #: Load-generator processes (the server has the machine's other core; 2 keeps both busy).
    #: None: the scenario's default (2; ``seed_compare``: one per load core).
    procs: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Directory for py-spy profiles of the server during the measured phase (None: no profiling).
    profile_dir: str | None = None
    #: ``--set name=value`` overrides of scenario sizes (e.g. jobs=200, window=16).
    overrides: dict[str, str] = field(default_factory=dict)
    #: The seed's peer folder for ``seed_compare`` (None: looked for beside the checkout).
    seed_dir: str | None = None


def _params(opts: Options, names: tuple[str, ...], quick: tuple, full: tuple) -> tuple:
    """The scenario's sizes: quick or full, then any ``--set name=value`` overrides."""
    values = dict(zip(names, quick if opts.quick else full, strict=True))
    for name, raw in opts.overrides.items():
        if name in values:
            values[name] = type(values[name])(float(raw)) if isinstance(values[name], int) else type(values[name])(raw)
    return tuple(values[n] for n in names)


def _tokens(svc: Service, n_clients: int, role: str, prefix: str) -> list[str]:
    n = max(1, -(-n_clients // CLIENTS_PER_TOKEN))
    return svc.tokens(n, role=role, prefix=prefix)


def _assign(tokens: list[str], i: int) -> str:
    return tokens[i // CLIENTS_PER_TOKEN % len(tokens)]


def _base(name: str, svc: Service, opts: Options, settings: dict) -> dict:
    env = {k: v for k, v in svc.server_env().items() if k.startswith("PS_") and not k.endswith("_URL")
           and k != "PS_WORKSPACE_ROOT"}
    return {
        "scenario": name,
        "settings": {**settings, "store": svc.store_kind, "uvicorn_ws": opts.ws_impl or "direct (cli)",
                     "server_loop": opts.loop, "loadgen_procs": opts.procs or DEFAULT_PROCS, "server_env": env,
                     "overrides": opts.overrides,
                     "quick": opts.quick},
    }


def _finish(out: dict, svc: Service, merged: dict, *, cpu: float, seconds: float, deliveries: int,
            redis_cpu: float | None = None, server_rates: dict | None = None) -> dict:
    lat = merged["latency"].summary()
    out.update(
        deliveries_per_s=round(deliveries / seconds, 1) if seconds > 0 else None,
        p50_ms=lat["p50_ms"],
        p99_ms=lat["p99_ms"],
        max_ms=lat["max_ms"],
        latency_samples=lat["samples"],
        cpu_s_per_100k=round(cpu / deliveries * 100_000, 3) if deliveries else None,
        server_cpu_s=round(cpu, 2),
        server_rss_mb=round(svc.rss() / 2**20, 1),
        measured_s=round(seconds, 2),
        deliveries=deliveries,
        lost=merged["lost"],
        dup=merged["dup"],
        closes=merged["closes"],
        errors=merged["errors"],
        loadgen_cpu_s=round(merged["loadgen_cpu_s"], 1),
        publisher_cpu_s=(merged["publisher"] or {}).get("cpu_s"),
        redis_cpu_s=round(redis_cpu, 2) if redis_cpu is not None else None,
        server_rates=server_rates,
        connect_retries=merged["retries"],
    )
    return out


def _profile_path(opts: Options, name: str) -> str | None:
    return str(Path(opts.profile_dir) / name) if opts.profile_dir else None


def _workers(svc: Service, clients: list[ClientSpec], rooms: list[str], opts: Options, **kw: object) -> list[WorkerConfig]:
    index = {r: i for i, r in enumerate(rooms)}
    return [WorkerConfig(host="127.0.0.1", port=svc.port, clients=part, room_index=index, **kw)  # type: ignore[arg-type]
            for part in split(clients, opts.procs or DEFAULT_PROCS)]


def _measure(orc: Orchestra, svc: Service, warmup: float, measure: float, profile: str | None = None) -> tuple[float, float]:
    """WARMUP for ``warmup`` s, then MEASURE for ``measure`` s; returns (server CPU s, seconds).

    With ``profile`` (a path without suffix), py-spy samples the server during
    the measured phase: a flame graph (``.svg``) and collapsed stacks (``.txt``).
    """
    orc.phase(WARMUP)
    time.sleep(warmup)
    c0 = svc.server_counters()
    cpu0, rcpu0, t0 = svc.cpu(), svc.redis_cpu(), time.monotonic()
    orc.phase(MEASURE)
    with profiler(svc.pid, profile, measure):
        time.sleep(measure)
    cpu1, rcpu1, t1 = svc.cpu(), svc.redis_cpu(), time.monotonic()
    c1 = svc.server_counters()
    orc.redis_cpu = rcpu1 - rcpu0
    # The server's own view: XREAD calls/s and messages per frame (batching), per second of measurement.
    orc.server_rates = {k.removeprefix("ps_").removesuffix("_total") + "_per_s": round((c1[k] - c0.get(k, 0)) / (t1 - t0), 1)
                        for k in c1}
    return cpu1 - cpu0, t1 - t0


@contextlib.contextmanager
def profiler(pid: int, path: str | None, seconds: float, *, stop_early: bool = False):
    """Run py-spy on ``pid`` for ``seconds`` (flame graph + collapsed stacks) when ``path`` is set.

    ``stop_early``: the block decides the length; py-spy is interrupted when it ends.
    """
    if not path:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--gil",
                          "--format", fmt, "-o", f"{path}.{ext}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fmt, ext in (("flamegraph", "svg"), ("raw", "txt"))
    ]
    try:
        yield
    finally:
        for p in procs:
            if stop_early and p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            try:
                p.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log(f"profile written to {path}.svg / {path}.txt")


# ---------------------------------------------------------------------------
# 1. hot room
# ---------------------------------------------------------------------------


def hot_room(opts: Options) -> dict:
    """N subscribers in one room with batching; closed-loop publisher with a window."""
    n, window, warmup, measure = _params(opts, ("subscribers", "window", "warmup", "measure"),
                                         (100, 32, 0.5, 2.0), (1000, 64, 3.0, 15.0))
    with Service(env=opts.extra_env, ws_impl=opts.ws_impl, loop=opts.loop) as svc:
        svc.start()
        tokens = _tokens(svc, n, "viewer", "hot")
        (job,) = svc.jobs(1)
        room = f"job:{job}"
        clients = [ClientSpec(token=_assign(tokens, i), rooms=[room], batch=True) for i in range(n)]
        workers = _workers(svc, clients, [room], opts, report_interval=0.005, progress_room=room)
        pub = PublisherConfig(redis_url=svc.redis_url, jobs=[job], mode="closed", window=window)
        out = _base("hot_room", svc, opts, {"subscribers": n, "window": window, "batch": True,
                                            "warmup_s": warmup, "measure_s": measure})
        with Orchestra(workers, pub, rooms=1) as orc:
            orc.go()
            orc.wait_joined(120)
            orc.start_publisher()
            orc.phase(WARMUP)
            orc.wait_first_delivery()
            cpu, secs = _measure(orc, svc, warmup, measure, _profile_path(opts, "hot_room"))
            merged = orc.stop_and_collect()
        _finish(out, svc, merged, cpu=cpu, seconds=secs, deliveries=merged["delivered"],
                redis_cpu=orc.redis_cpu, server_rates=orc.server_rates)
        out["messages_per_frame"] = round(merged["delivered_all"] / merged["frames"], 1) if merged["frames"] else None
        out["events_published"] = merged["publisher"]["published"]
        return out


# ---------------------------------------------------------------------------
# 2. many rooms
# ---------------------------------------------------------------------------


def many_rooms(opts: Options) -> dict:
    """J jobs x 4 watchers, each job publishing R events/s on a schedule (open loop)."""
    jobs_n, watchers, rate, warmup, measure = _params(opts, ("jobs", "watchers", "rate", "warmup", "measure"),
                                                      (50, 4, 10.0, 0.5, 2.0), (500, 4, 10.0, 3.0, 15.0))
    with Service(env=opts.extra_env, ws_impl=opts.ws_impl, loop=opts.loop) as svc:
        svc.start()
        n = jobs_n * watchers
        tokens = _tokens(svc, n, "viewer", "many")
        jobs = svc.jobs(jobs_n)
        rooms = [f"job:{j}" for j in jobs]
        clients = [ClientSpec(token=_assign(tokens, i), rooms=[rooms[i % jobs_n]]) for i in range(n)]
        workers = _workers(svc, clients, rooms, opts, report_interval=0.1)
        pub = PublisherConfig(redis_url=svc.redis_url, jobs=jobs, mode="open", rate=rate)
        out = _base("many_rooms", svc, opts, {"jobs": jobs_n, "watchers_per_job": watchers,
                                              "events_per_s_per_job": rate, "batch": False,
                                              "warmup_s": warmup, "measure_s": measure})
        with Orchestra(workers, pub, rooms=len(rooms)) as orc:
            orc.go()
            orc.wait_joined(120)
            orc.start_publisher()
            cpu, secs = _measure(orc, svc, warmup, measure, _profile_path(opts, "many_rooms"))
            merged = orc.stop_and_collect()
        _finish(out, svc, merged, cpu=cpu, seconds=secs, deliveries=merged["delivered"],
                redis_cpu=orc.redis_cpu, server_rates=orc.server_rates)
        out["publisher_max_behind_ms"] = merged["publisher"]["max_behind_ms"]
        out["events_published"] = merged["publisher"]["published"]
        return out


# ---------------------------------------------------------------------------
# 3. idle connections
# ---------------------------------------------------------------------------


def idle(opts: Options) -> dict:
    """N authenticated, joined, idle connections: connect time and RSS per connection."""
    n, jobs_n, hold, trace = _params(opts, ("connections", "jobs", "hold", "tracemalloc"),
                                     (300, 10, 1.0, 0), (5000, 100, 10.0, 0))
    with Service(env=opts.extra_env, ws_impl=opts.ws_impl, loop=opts.loop, tracemalloc=bool(trace)) as svc:
        svc.start()
        tokens = _tokens(svc, n, "viewer", "idle")
        jobs = svc.jobs(jobs_n)
        rooms = [f"job:{j}" for j in jobs]
        clients = [ClientSpec(token=_assign(tokens, i), rooms=[rooms[i % jobs_n]]) for i in range(n)]
        workers = _workers(svc, clients, rooms, opts, report_interval=0.02, connect_concurrency=250)
        out = _base("idle", svc, opts, {"connections": n, "jobs": jobs_n, "hold_s": hold,
                                        "connect_concurrency_per_proc": 250})
        with Orchestra(workers, None, rooms=len(rooms)) as orc:
            time.sleep(0.5)
            if trace:
                svc.memory_baseline()
                time.sleep(0.5)
            rss0 = svc.rss()
            cpu0 = svc.cpu()
            with profiler(svc.pid, _profile_path(opts, "idle_connect"), 300, stop_early=True):
                t_go = orc.go()
                orc.wait_joined(300)
            cpu_connect = svc.cpu() - cpu0
            time.sleep(1.0)  # let allocator and GC settle before reading RSS
            rss1 = svc.rss()
            if trace:
                # What each joined connection holds, by the line that allocated it (Python objects only).
                held = svc.memory_since()
                out["tracemalloc_bytes_per_conn"] = round(sum(b for b, _, _ in held) / n)
                out["tracemalloc_top_per_conn"] = [[round(b / n), round(c / n, 2), w.split("site-packages/")[-1]]
                                                   for b, c, w in held[:25]]
            cpu1 = svc.cpu()
            with profiler(svc.pid, _profile_path(opts, "idle_hold"), hold):
                time.sleep(hold)
            cpu_idle = svc.cpu() - cpu1
            rss2 = svc.rss()
            merged = orc.stop_and_collect()
        joined_at = sorted(merged["first_joined_at"])
        out.update(
            deliveries_per_s=None, p50_ms=None, p99_ms=None, max_ms=None, cpu_s_per_100k=None,
            connect_all_s=round(joined_at[-1] - t_go, 3) if joined_at else None,
            connect_p50_s=round(joined_at[len(joined_at) // 2] - t_go, 3) if joined_at else None,
            connections_per_s=round(n / (joined_at[-1] - t_go), 1) if joined_at else None,
            server_cpu_connect_s=round(cpu_connect, 2),
            server_rss_mb=round(rss2 / 2**20, 1),
            server_rss_base_mb=round(rss0 / 2**20, 1),
            rss_per_conn_kb=round((rss1 - rss0) / n / 1024, 2),
            rss_per_conn_after_hold_kb=round((rss2 - rss0) / n / 1024, 2),
            idle_cpu_pct=round(cpu_idle / hold * 100, 2),
            connect_retries=merged["retries"],
            closes=merged["closes"],
            errors=merged["errors"],
        )
        return out


# ---------------------------------------------------------------------------
# 4. reconnect storm
# ---------------------------------------------------------------------------


def reconnect_storm(opts: Options) -> dict:
    """N clients lose the server (SIGKILL + restart on the same port) and resume with ``since``."""
    n, jobs_n, rate, before = _params(opts, ("clients", "jobs", "rate", "before"),
                                      (100, 10, 2.0, 0.5), (2000, 100, 2.0, 3.0))
    # Quick runs check the mechanics (resume, no loss), not the policy's timing: a 2 s cap keeps them short.
    cap = 2.0 if opts.quick else BACKOFF_CAP
    with Service(env=opts.extra_env, ws_impl=opts.ws_impl, loop=opts.loop) as svc:
        svc.start()
        tokens = _tokens(svc, n, "viewer", "storm")
        jobs = svc.jobs(jobs_n)
        rooms = [f"job:{j}" for j in jobs]
        clients = [ClientSpec(token=_assign(tokens, i), rooms=[rooms[i % jobs_n]]) for i in range(n)]
        workers = _workers(svc, clients, rooms, opts, report_interval=0.05, reconnect=True, backoff_cap=cap)
        pub = PublisherConfig(redis_url=svc.redis_url, jobs=jobs, mode="open", rate=rate)
        out = _base("reconnect_storm", svc, opts, {
            "clients": n, "jobs": jobs_n, "events_per_s_per_job": rate, "restart": "SIGKILL + start, same port",
            "backoff": f"full jitter, base {BACKOFF_BASE} s, cap {cap} s"})
        with Orchestra(workers, pub, rooms=len(rooms)) as orc:
            orc.go()
            orc.wait_joined(180)
            orc.start_publisher()
            orc.phase(WARMUP)
            time.sleep(before)
            orc.phase(MEASURE)
            cpu0 = svc.cpu()
            t_kill = time.time()
            svc.kill()
            svc.start()
            t_ready = time.time()
            orc.wait(lambda: orc.rejoined() >= n, 120, "every client to rejoin")
            t_rejoined = time.time()
            cpu_storm = svc.cpu() - cpu0
            time.sleep(1.0)
            orc.ctl.pub_stop.value = 1  # the publisher writes each job's last seq into Control.target
            orc.wait(lambda: orc.caught_up() >= n, 60, "every client to see the last event of its job")
            merged = orc.stop_and_collect()
        rejoin = sorted(t - t_kill for t in merged["rejoin_at"])
        out.update(
            deliveries_per_s=None, p50_ms=None, p99_ms=None, max_ms=None, cpu_s_per_100k=None,
            all_resumed_s=round(rejoin[-1], 2) if rejoin else None,
            resumed_p50_s=round(statistics.median(rejoin), 2) if rejoin else None,
            server_restart_s=round(t_ready - t_kill, 2),
            server_cpu_storm_s=round(cpu_storm, 2),
            server_rss_mb=round(svc.rss() / 2**20, 1),
            rejoined=len(rejoin),
            lost=merged["lost"],
            dup_dropped=merged["dup"],
            gaps=merged["gaps"],
            connect_retries=merged["retries"],
            events_published=merged["publisher"]["published"],
            events_received=merged["delivered_all"],
            closes=merged["closes"],
            errors=merged["errors"],
            wall_s=round(t_rejoined - t_kill, 2),
        )
        return out


# ---------------------------------------------------------------------------
# 5. comments
# ---------------------------------------------------------------------------


def comments(opts: Options, *, store: str) -> dict:
    """Reviewers post back to back (next after ack) in one room watched by many.

    ``--set watcher_batch=1`` makes the watchers authenticate with ``batch:
    true``, as the web page (web/js/socket.js) does; the default (0) keeps
    them unbatched. The batched run is reported as its own, labelled row
    (scenario ``comments_<store>_batched``), not in place of the default.
    """
    reviewers, watchers, watcher_batch, warmup, measure, in_flight = _params(
        opts, ("reviewers", "watchers", "watcher_batch", "warmup", "measure", "in_flight"),
        (5, 20, 0, 0.5, 2.0, 1), (20, 200, 0, 2.0, 10.0, 1))
    batched = bool(watcher_batch)
    name = f"comments_{store}_batched" if batched else f"comments_{store}"
    env = {"PS_WS_CHAT_RATE": "1000000", "PS_WS_CHAT_BURST": "1000000", **opts.extra_env}
    pg = opts.pg_admin if store == "postgresql" else None
    if store == "postgresql" and not pg:
        raise BenchError("no PostgreSQL (pass --pg URL)")
    with Service(env=env, pg_admin=pg, ws_impl=opts.ws_impl, loop=opts.loop) as svc:
        svc.start()
        rev_tokens = svc.tokens(reviewers, role="reviewer", prefix="reviewer")
        watch_tokens = _tokens(svc, watchers, "viewer", "watcher")
        (job,) = svc.jobs(1)
        room = f"job:{job}"
        clients = [ClientSpec(token=t, rooms=[room], role="reviewer") for t in rev_tokens]
        clients += [ClientSpec(token=_assign(watch_tokens, i), rooms=[room], batch=batched) for i in range(watchers)]
        workers = _workers(svc, clients, [room], opts, report_interval=0.05, chats_in_flight=in_flight)
        out = _base(name, svc, opts, {"reviewers": reviewers, "watchers": watchers, "watcher_batch": batched,
                                      "comments_in_flight_per_reviewer": in_flight,
                                                     "warmup_s": warmup, "measure_s": measure,
                                                     "chat_rate_limit": "raised to 1e6/s"})
        with Orchestra(workers, None, rooms=1) as orc:
            orc.go()
            orc.wait_joined(120)
            cpu, secs = _measure(orc, svc, warmup, measure, _profile_path(opts, name))
            merged = orc.stop_and_collect()
        if merged["unavailable"] and merged["acks"] == 0:
            out.update(status="not available yet", deliveries_per_s=None, p50_ms=None, p99_ms=None, max_ms=None,
                       cpu_s_per_100k=None, acked_per_s=None, chat_errors=merged["chat_errors"],
                       server_rss_mb=round(svc.rss() / 2**20, 1))
            return out
        ack = merged["ack_latency"].summary()
        deliveries = merged["chats_delivered"]
        out.update(
            status="ok",
            acked_per_s=round(merged["acks"] / secs, 1),
            ack_p50_ms=ack["p50_ms"],
            ack_p99_ms=ack["p99_ms"],
            ack_max_ms=ack["max_ms"],
            deliveries_per_s=round(deliveries / secs, 1),
            cpu_s_per_100k=round(cpu / deliveries * 100_000, 3) if deliveries else None,
            server_cpu_s=round(cpu, 2),
            redis_cpu_s=round(orc.redis_cpu or 0, 2),
            server_rates=orc.server_rates,
            server_rss_mb=round(svc.rss() / 2**20, 1),
            measured_s=round(secs, 2),
            chat_errors=merged["chat_errors"],
            closes=merged["closes"],
            errors=merged["errors"],
        )
        chat = merged["chat_latency"].summary()
        # The table's latency columns show the figure of this scenario: the ack latency.
        out.update(p50_ms=ack["p50_ms"], p99_ms=ack["p99_ms"], max_ms=ack["max_ms"],
                   broadcast_p50_ms=chat["p50_ms"], broadcast_p99_ms=chat["p99_ms"])
        return out


SCENARIOS = ("hot_room", "many_rooms", "idle", "reconnect_storm", "comments")
