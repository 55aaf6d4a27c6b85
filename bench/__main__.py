"""``python -m bench run SCENARIO|all [--quick] [--json-out FILE]``: the benchmark harness.

Prints one JSON line per scenario (figures, machine, versions, settings), then
a markdown table of all of them. ``python -m bench table FILE`` re-renders the
table from a JSON-lines file written with ``--json-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from bench import stats
from bench.orchestra import BenchError
from bench.report import markdown_table, profile_top
from bench.scenarios import (
    SCENARIOS,
    Options,
    comments,
    hot_room,
    idle,
    many_rooms,
    reconnect_storm,
)
from bench.service import DEFAULT_PG, Service, pg_answers
from bench.tuning import raise_nofile

#: Scenarios run only when named (``all`` keeps to the five of issue 6).
EXTRA_SCENARIOS = ("seed_compare",)


def _run_one(name: str, opts: Options, pg_available: bool) -> list[dict]:
    if name == "hot_room":
        return [hot_room(opts)]
    if name == "many_rooms":
        return [many_rooms(opts)]
    if name == "idle":
        return [idle(opts)]
    if name == "reconnect_storm":
        return [reconnect_storm(opts)]
    if name == "comments":
        out = [comments(opts, store="sqlite")]
        if pg_available:
            out.append(comments(opts, store="postgresql"))
        else:
            out.append({"scenario": "comments_postgresql", "status": "skipped: no PostgreSQL (pass --pg URL)"})
        return out
    if name == "seed_compare":
        from bench.seed_compare import seed_compare  # noqa: PLC0415 - only this scenario needs the peer

        return [seed_compare(opts)]
    raise SystemExit(f"unknown scenario {name!r}; one of: {', '.join(SCENARIOS)}, all")


def cmd_run(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        if name not in (*SCENARIOS, *EXTRA_SCENARIOS):
            print(f"unknown scenario {name!r}; one of: {', '.join(SCENARIOS)}, all", file=sys.stderr)
            return 2
    raise_nofile()
    pg_admin = None
    if "comments" in names and not args.no_pg:
        candidate = args.pg or DEFAULT_PG
        if pg_answers(candidate):
            pg_admin = candidate
    opts = Options(quick=args.quick, ws_impl=args.ws, loop=args.loop, pg_admin=pg_admin, procs=args.procs,
                   profile_dir=args.profile, seed_dir=args.seed_dir,
                   overrides=dict(kv.split("=", 1) for kv in args.set),
                   extra_env=dict(kv.split("=", 1) for kv in args.env))
    common = {"machine": stats.machine(), "versions": stats.versions(Service.redis_server_binary())}
    results: list[dict] = []
    failed = False
    out_file = open(args.json_out, "a") if args.json_out else None  # noqa: SIM115 - lines appended as they come
    try:
        for name in names:
            started = time.monotonic()
            load_before = round(os.getloadavg()[0], 2)
            try:
                lines = _run_one(name, opts, pg_admin is not None)
            except (BenchError, RuntimeError, TimeoutError, OSError) as exc:
                failed = True
                lines = [{"scenario": name, "status": f"failed: {exc}"[:2000]}]
                traceback.print_exc(file=sys.stderr)
            for line in lines:
                line.setdefault("status", "ok")
                line["elapsed_s"] = round(time.monotonic() - started, 1)
                # Other work on the machine skews throughput and latency (not CPU per delivery): record it.
                line["loadavg_1m"] = [load_before, round(os.getloadavg()[0], 2)]
                line["at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                line.update(common)
                results.append(line)
                text = json.dumps(line, sort_keys=False)
                print(text, flush=True)
                if out_file:
                    out_file.write(text + "\n")
                    out_file.flush()
    finally:
        if out_file:
            out_file.close()
    print()
    print(markdown_table(results))
    for line in results:
        if line["scenario"] == "seed_compare":
            from bench.seed_compare import side_by_side_table  # noqa: PLC0415

            print()
            print(side_by_side_table(line))
    return 1 if failed else 0


def cmd_table(args: argparse.Namespace) -> int:
    with open(args.file) as f:
        results = [json.loads(line) for line in f if line.strip()]
    print(markdown_table(results))
    return 0


def cmd_micro(args: argparse.Namespace) -> int:
    from bench import micro  # noqa: PLC0415 - only this command needs the gateway imported

    return micro.main()


def cmd_top(args: argparse.Namespace) -> int:
    with open(args.file) as f:
        print(profile_top(f.read(), args.limit))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one scenario or all")
    p.add_argument("scenario", help=f"one of: {', '.join((*SCENARIOS, *EXTRA_SCENARIOS))}, all "
                                    f"(all = {', '.join(SCENARIOS)})")
    p.add_argument("--seed-dir", metavar="DIR", help="the seed's peer folder for seed_compare "
                   "(default: SEED_PEER_DIR, else ../shared/seed/peer beside the checkout or its parent)")
    p.add_argument("--quick", action="store_true", help="small sizes (all scenarios in < 60 s): a smoke test")
    p.add_argument("--json-out", metavar="FILE", help="append each result line to FILE")
    p.add_argument("--ws", choices=["direct", "websockets", "websockets-sansio", "wsproto"], default=None,
                   help="uvicorn WebSocket implementation (default: the server's own: direct, websockets-sansio plus the gateway's frame writer)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="server event loop (the CLI runs asyncio; uvloop measures the alternative)")
    p.add_argument("--pg", metavar="URL", help=f"PostgreSQL admin URL for the comments scenario (default {DEFAULT_PG} if it answers)")
    p.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL comments run")
    p.add_argument("--procs", type=int, default=None,
                   help="load-generator processes (default 2; seed_compare: one per load core, see bench/seed_compare.py)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a scenario size, e.g. --set jobs=200 --set window=16 (recorded in settings)")
    p.add_argument("--env", action="append", default=[], metavar="PS_NAME=VALUE",
                   help="a setting for the server under test (the harness passes no PS_ variable of its own environment)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the server during each measured phase (needs py-spy)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("table", help="markdown table from a --json-out file")
    p.add_argument("file")
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("micro", help="in-process micro-benchmarks of the per-delivery hot path")
    p.set_defaults(func=cmd_micro)
    p = sub.add_parser("top", help="top functions of a py-spy raw profile (--profile DIR/*.txt)")
    p.add_argument("file")
    p.add_argument("--limit", type=int, default=25)
    p.set_defaults(func=cmd_top)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
