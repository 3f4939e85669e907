"""``python -m benchmarks.ingest_broker`` at a small rate: the baseline consumer (the
node's own RabbitMQ client, no hub) receives every message the producers publish, once,
and reports a latency for each. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import require_service

ROOT = Path(__file__).resolve().parents[2]
#: The run takes about 10 s; this only bounds a hang.
RUN_TIMEOUT_S = 120


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_broker_baseline_consumes_every_message(tmp_path: Path) -> None:
    from tests.ingest.rabbit import HOST, PORT

    require_service("RabbitMQ", HOST, PORT)
    out = tmp_path / "broker.json"
    # fmt: off
    command = [
        sys.executable, "-m", "benchmarks.ingest_broker",
        "--rate", "1000", "--windows", "2", "--duration", "1", "--warmup", "0.5",
        "--out", str(out),
    ]
    # fmt: on
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    report = json.loads(out.read_text())
    assert report["checks_ok"] is True
    assert len(report["windows"]) == 2
    for window in report["windows"]:
        assert window["sent"] >= 1000  # 1.5 s at 1,000/s
        assert window["received"] == window["sent"]
        assert window["latency_samples"] >= 900  # the 1 s after the warm-up
        assert window["latency_ms_p99"] is not None
