"""The benchmark harness still runs against the daemon (small sizes; figures unchecked).

Speed is judged by `make bench`, never here: this only keeps the harness from
rotting as the protocol and the daemon change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_scenario_runs_at_a_small_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--receivers", "20", "--latency-receivers", "30", "--capacity", "120"]
    args += ["--step", "50", "--storm", "60", "--seconds", "0.5", "--warmup", "0.2"]
    args += ["--lag-rate", "500", "--lag-seconds", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chatbench.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    s = res["scenarios"]
    assert s["fanout_20"]["deliveries_per_s"] > 0
    assert s["fanout_20"]["accepted_per_s"] > 0
    assert s["latency"]["samples"] > 0 and s["latency"]["p99_ms"] >= s["latency"]["p50_ms"]
    assert s["capacity"]["clients"] == 120 and s["capacity"]["rss_mib"] > 0
    assert "stopped" not in s["capacity"]
    for key in ("storm_10", "storm_100", "storm_replay_20", "storm_replay_off"):
        assert s[key]["joined"] == 60 and s[key]["refused_or_reset_total"] == 0
    assert s["storm_replay_20"]["said"] == 20
    on_off = s["history_fanout_20"]
    assert on_off["on"]["accepted_per_s"] > 0 and on_off["off"]["accepted_per_s"] > 0
    assert on_off["deliveries_ratio"] > 0
    lag = s["write_lag"]
    assert lag["kept"] > 0 and lag["complete"] and lag["write_lag_p99_ms"] > 0
    assert res["machine"]["python"] and res["machine"]["cores"] >= 1
    assert "deliveries/s" in proc.stdout  # the table
    assert "history write lag" in proc.stdout
