"""``seed_compare``: the project beside the seed's Node ``ws`` server, same load, one run.

Both servers run at once, each server's process tree (the project's Redis
included: it is part of what the project costs) pinned to CPU 0 and the load
generators and the publisher to CPU 1. Every workload runs against the seed,
then against the project, ``rounds`` times, and the ratios are computed
within each round (the machine is shared: only figures of the same minute
compare):

- ``joins_one_room`` / ``joins_many_rooms``: N clients connect, authenticate
  and join (one room; 100 rooms); the wall time until the last is joined, and
  for one room the resident memory each idle joined connection adds. The
  one-room storm also runs against ``bench/floor.py`` (``uvicorn_floor``):
  the gateway's uvicorn setup with an app that only answers ``auth`` and
  ``join``, so the figures say what uvicorn costs and what the gateway adds;
- ``comment_fanout``: W watchers of one room (the project's with ``batch``,
  as the web page connects), R reviewers each keeping K comments in flight;
  comments delivered per server CPU-second and publish -> receipt latency;
- ``event_fanout``: W watchers; the project's job events come from its real
  publishing path (``streams.append_event``, as the worker, -> Redis -> hub),
  closed loop with a window; the seed's equivalent is a publisher client
  keeping as many chats of the same size in flight.

The load generator is the project's own (``bench/loadgen.py``); the seed's
protocol differs only in its token and in having no ``ack`` (a comment's own
broadcast answers it).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from bench.control import MEASURE, WARMUP
from bench.floor import FloorServer
from bench.loadgen import ClientSpec, WorkerConfig
from bench.orchestra import Orchestra, log, split
from bench.peer import SEED_TOKEN, PeerUnavailable, SeedPeer, find_seed_dir, node_binary
from bench.publisher import PublisherConfig, _event
from bench.scenarios import CLIENTS_PER_TOKEN, DEFAULT_PROCS, Options, _assign, _base, _params, _profile_path, _tokens, profiler
from bench.service import Service
from progress_service.streams import wire_bytes

SERVER_CPUS = {0}
LOAD_CPUS = (1,)


@dataclass
class Target:
    """One server under test and how the load generator speaks to it."""

    name: str
    port: int
    cpu: Callable[[], float]
    rss: Callable[[], int]
    #: Tokens for ``n`` watcher clients / ``n`` reviewers (the seed: its one fixed token).
    watcher_token: Callable[[int], str]
    reviewer_token: Callable[[int], str]
    batch: bool
    echo_acks: bool
    #: Other processes of this server whose CPU counts too (the project's Redis).
    extra_cpu: Callable[[], float] | None = None
    #: The server's Python process, for py-spy (``--profile``); None for the seed.
    py_pid: int | None = None


def _workers(t: Target, clients: list[ClientSpec], rooms: list[str], opts: Options, **kw: object) -> list[WorkerConfig]:
    index = {r: i for i, r in enumerate(rooms)}
    cpus = LOAD_CPUS if _pinning() else None
    return [WorkerConfig(host="127.0.0.1", port=t.port, clients=part, room_index=index, cpus=cpus, echo_acks=t.echo_acks,
                         **kw)  # type: ignore[arg-type]
            for part in split(clients, _procs(opts))]


def _procs(opts: Options) -> int:
    """Load-generator processes: ``--procs``, else one per load core.

    Two processes on the one load core only take turns. In the event run
    the closed loop then runs slower and the server's frames carry 9.4
    messages instead of 12.4, which is the load generator's limit, not the
    server's. The seed's figures are the same either way (2026-12-03, one
    process against two: joins 4,520-4,650 against 4,640-4,770 a second;
    comment deliveries per CPU-second 208,000-210,000 against
    205,000-215,000; event 205,000-206,000 against 200,000-216,000).
    """
    if opts.procs:
        return opts.procs
    return len(LOAD_CPUS) if _pinning() else DEFAULT_PROCS


def _pinning() -> bool:
    return (os.cpu_count() or 1) >= 2


def joins(t: Target, rooms: list[str], n: int, opts: Options, *, memory: bool) -> dict:
    """N clients connect + auth + join over ``rooms``; wall time, CPU and (``memory``) RSS per connection."""
    clients = [ClientSpec(token=t.watcher_token(i), rooms=[rooms[i % len(rooms)]], batch=t.batch) for i in range(n)]
    workers = _workers(t, clients, rooms, opts, report_interval=0.02, connect_concurrency=100)
    with Orchestra(workers, None, rooms=len(rooms)) as orc:
        time.sleep(0.5)
        rss0, cpu0 = t.rss(), t.cpu()
        path = _profile_path(opts, f"seed_compare_joins_{len(rooms)}") if t.py_pid else None
        with profiler(t.py_pid or 0, path, 300, stop_early=True):
            t_go = orc.go()
            orc.wait_joined(300)
        cpu = t.cpu() - cpu0
        time.sleep(1.0)  # let the allocator and the GC settle before reading RSS
        rss1 = t.rss()
        merged = orc.stop_and_collect()
    done = max(merged["first_joined_at"]) - t_go
    out = {"clients": n, "rooms": len(rooms), "all_joined_s": round(done, 3), "joins_per_s": round(n / done, 1),
           "server_cpu_s": round(cpu, 2), "cpu_ms_per_join": round(cpu / n * 1000, 3),
           "retries": merged["retries"]}
    if memory:
        out["rss_per_conn_kb"] = round((rss1 - rss0) / n / 1024, 2)
        out["rss_mb"] = round(rss1 / 2**20, 1)
    return out


def _measure(orc: Orchestra, t: Target, warmup: float, measure: float, opts: Options, name: str) -> tuple[float, float, float]:
    """WARMUP, then MEASURE; (server CPU s, extra CPU s, seconds) of the measured phase."""
    orc.phase(WARMUP)
    time.sleep(warmup)
    cpu0, x0, t0 = t.cpu(), t.extra_cpu() if t.extra_cpu else 0.0, time.monotonic()
    orc.phase(MEASURE)
    with profiler(t.py_pid or 0, _profile_path(opts, f"seed_compare_{name}") if t.py_pid else None, measure):
        time.sleep(measure)
    cpu1, x1, t1 = t.cpu(), t.extra_cpu() if t.extra_cpu else 0.0, time.monotonic()
    return cpu1 - cpu0, x1 - x0, t1 - t0


def _fanout_figures(delivered: int, hist: object, cpu: float, extra: float, secs: float) -> dict:
    lat = hist.summary()  # type: ignore[attr-defined]
    return {"deliveries": delivered, "deliveries_per_s": round(delivered / secs, 1),
            "deliveries_per_cpu_s": round(delivered / cpu) if cpu > 0 else None,
            "deliveries_per_cpu_s_with_redis": round(delivered / (cpu + extra)) if cpu + extra > 0 else None,
            "server_cpu_s": round(cpu, 2), "redis_cpu_s": round(extra, 2), "measured_s": round(secs, 2),
            "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "max_ms": lat["max_ms"]}


def comment_fanout(t: Target, room: str, sizes: dict, opts: Options) -> dict:
    """Reviewers keep comments in flight in one room watched by many."""
    clients = [ClientSpec(token=t.reviewer_token(i), rooms=[room], role="reviewer") for i in range(sizes["reviewers"])]
    clients += [ClientSpec(token=t.watcher_token(i), rooms=[room], batch=t.batch) for i in range(sizes["watchers"])]
    workers = _workers(t, clients, [room], opts, report_interval=0.05, chats_in_flight=sizes["in_flight"])
    with Orchestra(workers, None, rooms=1) as orc:
        orc.go()
        orc.wait_joined(120)
        cpu, extra, secs = _measure(orc, t, sizes["warmup"], sizes["measure"], opts, "comments")
        merged = orc.stop_and_collect()
    out = _fanout_figures(merged["chats_delivered"], merged["chat_latency"], cpu, extra, secs)
    out.update(comments_per_s=round(merged["acks"] / secs, 1), frames_per_s=round(merged["frames_measured"] / secs, 1),
               chat_errors=merged["chat_errors"], closes=merged["closes"])
    return out


def _seed_chat_chars(room: str) -> int:
    """Chat text length that makes the seed's broadcast as long as the project's job event on the wire."""
    stored = msgspec.structs.replace(_event(1, time.time_ns()), attempt=1)  # as the worker's Publisher stores it
    event = wire_bytes(room, b"1764600000000-0", {b"t": b"event", b"b": msgspec.json.encode(stored)})
    frame = {"type": "chat", "id": str(uuid.uuid4()), "requestId": uuid.uuid4().hex, "roomId": room,
             "userId": "user-12345678", "text": "", "sentAt": "2026-12-01T21:00:00.000Z"}
    return max(30, len(event) - len(json.dumps(frame, separators=(",", ":"))))


def event_fanout(t: Target, room: str, job: str | None, svc: Service, sizes: dict, opts: Options) -> dict:
    """W watchers; the project's events from its publishing path, the seed's from a publisher client."""
    watchers = [ClientSpec(token=t.watcher_token(i), rooms=[room], batch=t.batch) for i in range(sizes["watchers"])]
    if job is not None:  # the project: worker -> Redis -> hub
        workers = _workers(t, watchers, [room], opts, report_interval=0.005, progress_room=room)
        pub = PublisherConfig(redis_url=svc.redis_url, jobs=[job], mode="closed", window=sizes["window"],
                              cpus=LOAD_CPUS if _pinning() else None,
                              # --set event_path=streams: streams.append_event, the path the worker used before
                              # its buffered Publisher (one XADD MULTI per event, no archive)
                              worker_database_url=svc.database_url
                              if opts.overrides.get("event_path", "worker") == "worker" else None)
    else:  # the seed: one client broadcasting, ``window`` chats in flight
        publisher = ClientSpec(token=SEED_TOKEN, rooms=[room], role="reviewer")
        workers = _workers(t, [publisher, *watchers], [room], opts, report_interval=0.05,
                           chats_in_flight=sizes["window"], chat_chars=_seed_chat_chars(room))
        pub = None
    with Orchestra(workers, pub, rooms=1) as orc:
        orc.go()
        orc.wait_joined(120)
        if pub is not None:
            orc.start_publisher()
            orc.phase(WARMUP)
            orc.wait_first_delivery()
        cpu, extra, secs = _measure(orc, t, sizes["warmup"], sizes["measure"], opts, "events")
        merged = orc.stop_and_collect()
    if job is not None:
        out = _fanout_figures(merged["delivered"], merged["latency"], cpu, extra, secs)
        out.update(path=opts.overrides.get("event_path", "worker"), lost=merged["lost"], dup=merged["dup"], published=(merged["publisher"] or {}).get("published"),
                   delivered_all=merged["delivered_all"])
    else:
        out = _fanout_figures(merged["chats_delivered"], merged["chat_latency"], cpu, extra, secs)
    out["frames_per_s"] = round(merged["frames_measured"] / secs, 1)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


#: Per workload: (figure, "higher"|"lower" is better) whose project/seed ratio is reported.
RATIOS = {
    "joins_one_room": [("joins_per_s", "higher"), ("rss_per_conn_kb", "lower"), ("cpu_ms_per_join", "lower")],
    "joins_many_rooms": [("joins_per_s", "higher"), ("cpu_ms_per_join", "lower")],
    "comment_fanout": [("deliveries_per_cpu_s", "higher"), ("p50_ms", "lower"), ("p99_ms", "lower")],
    "event_fanout": [("deliveries_per_cpu_s", "higher"), ("p50_ms", "lower"), ("p99_ms", "lower")],
}


def _summarize(rounds: list[dict]) -> dict:
    """Per workload and figure: each round's project/seed ratio and their median/min/max."""
    out: dict = {}
    for workload, figures in RATIOS.items():
        for fig, _better in figures:
            values = [_ratio(r[workload]["project"].get(fig), r[workload]["seed"].get(fig)) for r in rounds
                      if workload in r]
            values = [v for v in values if v is not None]
            if values:
                out.setdefault(workload, {})[fig] = {"median": round(statistics.median(values), 2),
                                                     "min": min(values), "max": max(values), "rounds": values}
    return out


def _round(k: int, peer: SeedPeer, svc: Service, opts: Options, only: set[str], sizes: dict,
           n_join: int, n_rooms: int) -> dict:
    """Every workload against the seed, then the project: one round's figures."""
    watch_tokens = _tokens(svc, max(n_join, sizes["watchers"]), "viewer", "cmp")
    rev_tokens = svc.tokens(sizes["reviewers"], role="reviewer", prefix="cmp-reviewer")
    jobs = svc.jobs(n_rooms + 3)
    rooms = [f"job:{j}" for j in jobs]
    project = Target("project", svc.port, svc.cpu, svc.rss, lambda i: _assign(watch_tokens, i),
                     lambda i: rev_tokens[i % len(rev_tokens)], batch=True, echo_acks=False,
                     extra_cpu=svc.redis_cpu, py_pid=svc.pid)
    seed = Target("seed", peer.port, peer.cpu, peer.rss, lambda i: SEED_TOKEN, lambda i: SEED_TOKEN,
                  batch=False, echo_acks=True)
    r: dict = {}
    for t in (seed, project):
        log(f"round {k + 1}: {t.name}")
        # Fresh rooms per workload: the project's presence grace of one phase does not reach the next.
        runs: dict[str, Callable[[Target], dict]] = {
            "joins_one_room": lambda t: joins(t, rooms[:1], n_join, opts, memory=True),
            "joins_many_rooms": lambda t: joins(t, rooms[1 : 1 + n_rooms], n_join, opts, memory=False),
            "comment_fanout": lambda t: comment_fanout(t, rooms[n_rooms + 1], sizes, opts),
            "event_fanout": lambda t: event_fanout(t, rooms[n_rooms + 2], jobs[n_rooms + 2] if t is project else None,
                                                   svc, sizes, opts),
        }
        for workload, run in runs.items():
            if workload in only:
                r.setdefault(workload, {})[t.name] = run(t)
        if not peer.alive():
            raise RuntimeError(f"the seed peer exited:\n{peer.log_path.read_text()[-2000:]}")
    if "joins_one_room" in only:
        log(f"round {k + 1}: uvicorn floor")
        with FloorServer(cpus=SERVER_CPUS if _pinning() else None) as floor:
            t = Target("uvicorn_floor", floor.port, floor.cpu, floor.rss, lambda i: "floor", lambda i: "floor",
                       batch=True, echo_acks=False)
            r["joins_one_room"]["uvicorn_floor"] = joins(t, rooms[:1], n_join, opts, memory=True)
    return r


def seed_compare(opts: Options) -> dict:
    """The side-by-side run (one JSON line), or a ``skipped`` line naming what is missing."""
    n_join, n_rooms, watchers, reviewers, in_flight, window, warmup, measure, rounds = _params(
        opts, ("joins", "join_rooms", "watchers", "reviewers", "in_flight", "window", "warmup", "measure", "rounds"),
        (200, 10, 100, 2, 4, 16, 0.5, 1.5, 1), (2000, 100, 1000, 4, 8, 64, 2.0, 8.0, 1))
    try:
        seed_dir = find_seed_dir(opts.seed_dir)
        node_binary()
    except PeerUnavailable as exc:
        return {"scenario": "seed_compare", "status": f"skipped: {exc}"}
    sizes = {"watchers": watchers, "reviewers": reviewers, "in_flight": in_flight, "window": window,
             "warmup": warmup, "measure": measure}
    env = {"PS_WS_CHAT_RATE": "1000000", "PS_WS_CHAT_BURST": "1000000", **opts.extra_env}
    pin = SERVER_CPUS if _pinning() else None
    only = set(filter(None, opts.overrides.get("only", "").split(","))) or set(RATIOS)
    results: list[dict] = []
    out: dict = {}
    try:
        for k in range(rounds):
            # Both servers start afresh each round: a round's joins and memory
            # start from an empty process, and no room carries an earlier round's log.
            with SeedPeer(seed_dir, cpus=pin) as peer, Service(env=env, ws_impl=opts.ws_impl, loop=opts.loop) as svc:
                svc.start()
                if pin:
                    svc.pin(pin)
                results.append(_round(k, peer, svc, opts, only, sizes, n_join, n_rooms))
                svc_rss_mb = svc.rss() / 2**20
                if not out:
                    out = _base("seed_compare", svc, opts, {
                        "joins": n_join, "join_rooms": n_rooms, "clients_per_token": CLIENTS_PER_TOKEN, **sizes,
                        "rounds": rounds, "server_cpus": sorted(pin) if pin else None,
                        "load_cpus": list(LOAD_CPUS) if pin else None, "seed_dir": str(seed_dir),
                        "project_watchers_batch": True})
                    out["settings"]["loadgen_procs"] = _procs(opts)
    except PeerUnavailable as exc:
        return {"scenario": "seed_compare", "status": f"skipped: {exc}"}
    summary = _summarize(results)
    cf = results[-1].get("comment_fanout", {}).get("project", {})
    per_cpu = cf.get("deliveries_per_cpu_s")
    out.update(
        status="ok",
        deliveries_per_s=cf.get("deliveries_per_s"), p50_ms=cf.get("p50_ms"), p99_ms=cf.get("p99_ms"),
        max_ms=cf.get("max_ms"), cpu_s_per_100k=round(100_000 / per_cpu, 3) if per_cpu else None,
        server_rss_mb=round(svc_rss_mb, 1),
        ratios=summary, rounds=results,
    )
    return out


def side_by_side_table(r: dict) -> str:
    """The markdown table of a ``seed_compare`` line: last round's figures, ratios over all rounds."""
    if r.get("status") != "ok":
        return f"seed_compare: {r.get('status')}"
    last = r["rounds"][-1]
    labels = {"joins_per_s": "joins/s", "rss_per_conn_kb": "RSS KB per idle joined conn",
              "cpu_ms_per_join": "server CPU ms per join", "deliveries_per_cpu_s": "deliveries per server CPU-s",
              "p50_ms": "p50 ms", "p99_ms": "p99 ms"}
    lines = ["| workload | figure | project | seed | ratio (median; min–max over rounds) | uvicorn floor |",
             "|---|---|---:|---:|---|---:|"]
    for workload, figures in RATIOS.items():
        for fig, better in figures:
            if workload not in last:
                continue
            ratio = r["ratios"].get(workload, {}).get(fig)
            spread = f"{ratio['median']}× ({ratio['min']}–{ratio['max']}; {better} is better)" if ratio else "–"
            floor = last[workload].get("uvicorn_floor", {}).get(fig, "–")
            lines.append(f"| {workload} | {labels[fig]} | {last[workload]['project'].get(fig)} | "
                         f"{last[workload]['seed'].get(fig)} | {spread} | {floor} |")
    return "\n".join(lines)
