"""The markdown results table (the README's Performance section copies it)."""

from __future__ import annotations


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _key_figure(r: dict) -> str:
    """The scenario-specific figure that the common columns do not show."""
    s = r.get("scenario", "")
    if s == "hot_room":
        return f"{_fmt(r.get('settings', {}).get('subscribers'))} subscribers, {_fmt(r.get('messages_per_frame'))} msgs/frame"
    if s == "many_rooms":
        st = r.get("settings", {})
        return f"{_fmt(st.get('jobs'))} jobs x {_fmt(st.get('watchers_per_job'))}, {_fmt(st.get('events_per_s_per_job'))} ev/s/job"
    if s == "idle":
        return (f"{_fmt(r.get('settings', {}).get('connections'))} conns: {_fmt(r.get('rss_per_conn_kb'))} KB/conn, "
                f"all joined in {_fmt(r.get('connect_all_s'))} s")
    if s == "reconnect_storm":
        return (f"{_fmt(r.get('rejoined'))} clients resumed in {_fmt(r.get('all_resumed_s'))} s "
                f"(restart {_fmt(r.get('server_restart_s'))} s), lost {_fmt(r.get('lost'))}")
    if s.startswith("comments"):
        if r.get("acked_per_s") is None:
            return ""
        watchers = "batching" if r.get("settings", {}).get("watcher_batch") else "unbatched"
        return (f"{_fmt(r.get('acked_per_s'))} acked comments/s (p99 ack {_fmt(r.get('ack_p99_ms'))} ms), "
                f"{_fmt(r.get('settings', {}).get('watchers'))} {watchers} watchers")
    return ""


def markdown_table(results: list[dict]) -> str:
    """One row per result line."""
    head = ("| scenario | status | deliveries/s | p50 ms | p99 ms | max ms | server CPU s / 100k | server RSS MB | key figure |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for r in results:
        rows.append("| " + " | ".join([
            r.get("scenario", "?"),
            str(r.get("status", "ok"))[:60],
            _fmt(r.get("deliveries_per_s")),
            _fmt(r.get("p50_ms")),
            _fmt(r.get("p99_ms")),
            _fmt(r.get("max_ms")),
            _fmt(r.get("cpu_s_per_100k")),
            _fmt(r.get("server_rss_mb")),
            _key_figure(r),
        ]) + " |")
    note = ""
    if results and "machine" in results[0]:
        m, v = results[0]["machine"], results[0].get("versions", {})
        note = (f"\n\nMachine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('mem_gb')} GB; "
                f"Python {v.get('python')}, litestar {v.get('litestar')}, uvicorn {v.get('uvicorn')}, "
                f"websockets {v.get('websockets')}, redis-server {v.get('redis_server')}.")
    return head + "\n" + "\n".join(rows) + note


def profile_top(collapsed: str, limit: int = 25) -> str:
    """Top functions by self and by inclusive samples from py-spy's ``--format raw`` output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:limit]]
    return "\n".join(lines)
