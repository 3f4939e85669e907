"""``python -m benchmarks run --quick`` end to end: every workload against the hub and
both peers, real processes, real sockets, every frame counted.

Only the counting is asserted (every workload ran, nothing missing, no gap, duplicate or
bad frame, no connection failed or lost); timings on a shared CI machine mean nothing, so
no timing threshold is checked. Needs the ``bench`` extra, RabbitMQ and redis-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runner import WORKLOADS

ROOT = Path(__file__).resolve().parents[2]
#: The quick run takes under two minutes here; this only bounds a hang.
RUN_TIMEOUT_S = 420


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.redis
def test_quick_run_counts_every_frame_of_every_workload(tmp_path: Path) -> None:
    for module in ("socketio", "uvicorn", "matplotlib", "rich", "websockets"):
        pytest.importorskip(module, reason="pip install -e '.[bench]'")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    logs = "\n".join(
        f"--- {log.name}\n" + log.read_text()[-3000:] for log in (tmp_path / "logs").glob("*.log")
    )
    output = result.stdout[-3000:] + result.stderr[-3000:] + logs
    assert (tmp_path / "bench.json").exists(), output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert result.returncode == 0, output

    assert report["quick"] is True
    assert report["workloads_ran"] == list(WORKLOADS)
    assert report["workloads_failed"] == []
    for name in WORKLOADS:
        assert "error" not in report["runs"][name], report["runs"][name]
        assert report["workloads"][name]["checks_ok"] is True, name

    total = report["counting"]["total"]
    assert total["gaps"] == 0
    assert total["duplicates"] == 0
    assert total["bad_frames"] == 0
    assert total["missing"] == 0
    assert total["extra"] == 0
    assert total["connections_failed"] == 0
    assert total["connections_lost"] == 0

    workloads = report["workloads"]
    servers = {"hub", "websockets", "socketio"}
    assert {run["server"] for run in workloads["fanout"]["runs"]} == servers
    assert {run["server"] for run in workloads["users"]["runs"]} == servers
    assert {run["server"] for run in workloads["idle"]["runs"]} == servers
    assert {run["server"] for run in workloads["ingest"]["runs"]} == {"hub", "socketio"}
    assert {(run["server"], run["nodes"]) for run in workloads["cluster"]["runs"]} == {
        ("hub", 1),
        ("hub", 2),
        ("socketio", 1),
        ("socketio", 2),
    }
    for run in workloads["fanout"]["runs"]:
        checks = run["checks"]
        assert checks["expected_deliveries"] > 0
        assert checks["received_deliveries"] == checks["expected_deliveries"], run["server"]
        assert checks["sample_checked"] > 0
    for run in workloads["ingest"]["runs"]:
        phases = run["phases"]
        if run["server"] == "hub":  # the node's counters were read at both ends
            assert phases["max"]["frames_per_write"] >= 1, phases["max"]
            assert phases["half"]["frames_per_write"] >= 1, phases["half"]
            for phase in ("max", "half"):  # read from the loop-lag histogram
                assert isinstance(phases[phase]["node_loop_stalls_over_50ms"], int), phase
        assert len(phases["half"]["latency_ms_p99_per_second"]) >= 1
    for run in workloads["idle"]["runs"]:
        assert run["connections_held"] == run["levels"][-1]["connections"] > 0, run["server"]
        assert run["levels"][-1]["broadcast"]["missing"] == 0
    rest = workloads["rest"]["runs"][0]
    assert rest["users_me"]["max"]["errors"] == 0
    assert rest["login_burst"]["statuses"] == {"200": rest["login_burst"]["logins"]}

    # The report's by-products: ratios, every target with a verdict, plots.
    assert report["ratios"]["fanout_deliveries_per_s"]["socketio"]
    assert {t["name"] for t in report["targets"]} >= {
        "fanout_vs_socketio_at_5000",
        "fanout_vs_websockets_at_5000",
        "idle_kb_per_connection",
        "idle_broadcast_p99_s",
        "rest_loop_lag_p99_ms",
    }
    assert all(t["verdict"] for t in report["targets"])
    assert "plots_error" not in report, report.get("plots_error")
    assert all((tmp_path / plot).stat().st_size > 0 for plot in report["plots"])
