"""``python -m bench --smoke`` end to end: every process starts, load runs through every
scenario, the report is written, and every process is stopped afterwards.

No figure is asserted (the machine is shared): only that the harness measured what it says
it measured, with 200s from the gateway and no failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 600

GATEWAY_ROWS = {
    "key-auth",
    "full",
    "key-auth/body-1k",
    "key-auth/body-64k",
    "key-auth/workers-2",
    "large-config",
}
BASELINE_ROWS = {
    "direct",
    "bare-proxy",
    "direct/body-1k",
    "bare-proxy/body-1k",
    "direct/body-64k",
    "bare-proxy/body-64k",
    "bare-proxy/workers-2",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; /proc says so.
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str, redis_url: str) -> dict:
    out = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--output-dir",
            str(out),
            "--postgres-url",
            postgres_admin_url,
            "--redis-url",
            redis_url,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"bench --smoke failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-8000:]}"
    assert "scenario" in proc.stdout and "req/s" in proc.stdout, proc.stdout  # the table was printed
    report: dict = json.loads((out / "latest.json").read_text())
    stamped = [p for p in out.iterdir() if p.name != "latest.json" and p.suffix == ".json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == report
    return report


def test_smoke_report_has_every_scenario_and_baseline(smoke_report: dict) -> None:
    names = {row["name"] for row in smoke_report["results"]}
    expected = GATEWAY_ROWS | BASELINE_ROWS
    if shutil.which("nginx"):
        expected |= {"nginx-proxy", "nginx-proxy/body-1k", "nginx-proxy/body-64k"}
    assert expected <= names, f"missing: {expected - names}"
    assert "jwt" in names
    assert smoke_report["mode"] == "smoke"
    assert smoke_report["error"] is None


def test_smoke_every_measured_row_has_throughput_and_no_errors(smoke_report: dict) -> None:
    for row in smoke_report["results"]:
        if row.get("skipped"):
            # Only a scenario whose feature the data plane lacks may be skipped, with the reason.
            assert row["name"] == "jwt" and row["skipped"], row
            continue
        assert "error" not in row, row
        assert row["probe_status"] == 200, row
        for run in ("throughput", "latency"):
            assert row[run]["requests"] > 0 and row[run]["rps"] > 0, row
            assert row[run]["errors"] == 0, row
            assert 0 < row[run]["p50_ms"] <= row[run]["p99_ms"] <= row[run]["p999_ms"], row


def test_smoke_gateway_rows_are_compared_with_the_same_runs_baselines(smoke_report: dict) -> None:
    rows = {row["name"]: row for row in smoke_report["results"]}
    for name in GATEWAY_ROWS:
        row = rows[name]
        assert row["kind"] == "gateway"
        assert set(row["vs_bare"]) >= {"rps", "p50", "p99", "p999"}
        expected = rows[row["bare"]]["throughput"]["rps"]
        assert row["vs_bare"]["rps"] == pytest.approx(row["throughput"]["rps"] / expected, rel=1e-2)
        assert set(row["added_latency_ms"]) == {"p50", "p99", "p999"}
    assert rows["key-auth/workers-2"]["bare"] == "bare-proxy/workers-2"
    assert rows["key-auth/body-64k"]["request"]["body_bytes"] == 64 * 1024


def test_smoke_reports_machine_features_dataset_and_memory(smoke_report: dict) -> None:
    machine = smoke_report["machine"]
    assert machine["cpu_count"] >= 1
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    assert smoke_report["placement"]["note"]
    assert smoke_report["features"]["key_auth"] is True
    dataset = smoke_report["dataset"]
    assert (dataset["routes"], dataset["tenants"], dataset["keys"]) == (300, 300, 1000)
    memory = smoke_report["memory"]
    assert memory["large_config"]["workers"] == 1
    assert all(mb and mb > 0 for mb in memory["large_config"]["rss_mb_per_worker"])
    assert memory["small_config_2_workers"]["workers"] == 2


def test_smoke_stops_every_process_it_started(smoke_report: dict) -> None:
    started = smoke_report["processes"]
    names = {p["name"] for p in started}
    assert {"control-plane", "bench-dp", "bench-dp-w2", "bare-proxy-w1", "bare-proxy-w2"} <= names
    assert "bench-dp-w2-worker" in names  # the 2-worker node's workers were seen, and must be gone too
    assert [p for p in started if _alive(p["pid"])] == []
