"""`python -m server.bench --sweep` at tiny size on the CPU: refines through the real worker and HTTP/SSE,
one row per size and max_batch_jobs, with throughput, latency and first-preview percentiles."""

from __future__ import annotations

import json

from server.bench import main


def test_sweep_reports_every_config(tmp_path):
    out = tmp_path / "sweep.json"
    argv = ["--sweep", "--preset", "tiny", "--device", "cpu", "--sizes", "64:3,32:3", "--batch", "1,3"]
    assert main([*argv, "--sweep-jobs", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["conditions"]["backend"] == "exact" and r["conditions"]["jobs_per_config"] == 3
    rows = {(row["size"], row["max_batch_jobs"]): row for row in r["results"]}
    assert set(rows) == {(64, 1), (64, 3), (32, 1), (32, 3)}
    for row in rows.values():
        assert row["jobs"] == 3 and row["jobs_per_min"] > 0
        lat, ttfp = row["latency"], row["time_to_first_preview"]
        assert lat["n"] == 3 and ttfp["n"] == 3
        assert 0 < ttfp["p50_s"] <= lat["p50_s"] and lat["p50_s"] <= lat["p95_s"]
    # One job at a time: the last job waits for the others, so the latency spreads.
    assert rows[(64, 1)]["latency"]["p95_s"] > rows[(64, 1)]["latency"]["p50_s"]
