"""``python -m benchmarks.fanout --quick`` end to end: a real node, real sockets, every
frame counted. Only the counting is checked (no gaps, no duplicates, no bad frames, nothing
missing, every connection opened); timings on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


@pytest.mark.slow
def test_quick_fanout_counts_every_frame(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fanout", "--quick", "--idle", "300", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    (run,) = report["fanout"]
    checks = run["checks"]
    assert checks["expected_deliveries"] > 0
    assert checks["received_deliveries"] == checks["expected_deliveries"]
    assert checks["sample_checked"] > 0
    assert checks["sample_gaps"] == checks["sample_duplicates"] == checks["bad_frames"] == 0
    assert checks["connections_failed"] == checks["connections_lost"] == 0
    assert run["phases"]["half"]["latency_samples"] > 0
    assert report["idle"]["connections"] == 300
    assert report["idle"]["kb_per_connection"] is not None
