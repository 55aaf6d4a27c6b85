"""The benchmark harness still runs: ``python -m bench run all --quick``.

This checks that every scenario completes and reports its figures with the
expected keys, not how fast anything is (figures come from ``bench/``, and a
shared CI machine is no place to judge them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMON_KEYS = {"scenario", "status", "deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "cpu_s_per_100k",
               "server_rss_mb", "machine", "versions", "settings"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_run_of_every_scenario_reports_its_figures(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "all", "--quick", "--json-out", str(out_file)],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=140, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert printed == written
    by_name = {r["scenario"]: r for r in printed}
    assert {"hot_room", "many_rooms", "idle", "reconnect_storm", "comments_sqlite", "comments_postgresql"} <= set(by_name)

    for r in printed:
        if r["status"].startswith("skipped"):  # PostgreSQL not reachable here
            assert os.environ.get("PS_TEST_STRICT") != "1", f"{r['scenario']}: {r['status']}"
            continue
        assert COMMON_KEYS <= set(r), f"{r['scenario']} lacks {COMMON_KEYS - set(r)}"
        assert r["status"] in ("ok", "not available yet"), r["status"]
        assert r["versions"]["python"] and r["machine"]["nproc"] >= 1
        assert r["settings"]["quick"] is True

    for name in ("hot_room", "many_rooms"):
        r = by_name[name]
        assert r["deliveries"] > 0 and r["p99_ms"] is not None and r["cpu_s_per_100k"] is not None
        assert r["lost"] == 0, r
    assert by_name["idle"]["rss_per_conn_kb"] is not None and by_name["idle"]["connect_all_s"] > 0
    storm = by_name["reconnect_storm"]
    assert storm["rejoined"] == storm["settings"]["clients"] and storm["lost"] == 0
    comments = by_name["comments_sqlite"]
    assert comments["status"] == "not available yet" or comments["acked_per_s"] > 0

    # The markdown table follows the JSON lines.
    assert "| scenario | status | deliveries/s |" in proc.stdout
