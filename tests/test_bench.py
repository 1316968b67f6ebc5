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

sys.path.insert(0, str(ROOT / "bench"))
import chatbench
import member_memory


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_scenario_runs_at_a_small_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--receivers", "20", "--latency-receivers", "30", "--capacity", "120"]
    args += ["--step", "50", "--storm", "60", "--seconds", "0.5", "--warmup", "0.2"]
    args += ["--latency-rates", "50"]
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
    lat = s["latency_50"]
    assert lat["samples"] > 0 and lat["p99_ms"] >= lat["p50_ms"]
    for place in chatbench.PROBE_PLACES:
        assert lat[f"max_ms_{place}"] >= lat[f"p50_ms_{place}"] > 0
    assert lat["send_us"] > 0 and lat["floor_ms"] > 0
    assert s["capacity"]["clients"] == 120 and s["capacity"]["rss_mib"] > 0
    assert "per_member_kib" in s["capacity"]
    assert s["memory"]["python_bytes_per_member"] > 0 and s["memory"]["breakdown"]
    assert "stopped" not in s["capacity"]
    for key in ("storm_10", "storm_100", "storm_replay_20", "storm_replay_off"):
        assert s[key]["joined"] == 60 and s[key]["refused_or_reset_total"] == 0
        assert s[key]["notice_bytes_per_join"] > 0, s[key]
    assert s["storm_replay_20"]["said"] == 20
    on_off = s["history_fanout_20"]
    assert on_off["on"]["accepted_per_s"] > 0 and on_off["off"]["accepted_per_s"] > 0
    assert on_off["deliveries_ratio"] > 0
    lag = s["write_lag"]
    assert lag["kept"] > 0 and lag["complete"] and lag["write_lag_p99_ms"] > 0
    assert res["machine"]["python"] and res["machine"]["cores"] >= 1
    assert "deliveries/s" in proc.stdout  # the table
    assert "history write lag" in proc.stdout


def test_percentiles_of_latencies_in_ns_are_in_ms() -> None:
    lat = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms, shuffled order kept out
    assert chatbench.percentiles(list(reversed(lat))) == {
        "p50_ms": 51.0,
        "p99_ms": 100.0,
        "max_ms": 100.0,
    }
    assert chatbench.percentiles([]) == {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}


def test_the_floor_is_one_send_per_receiver() -> None:
    assert chatbench.floor_ms(1000, 5.0) == 5.0
    assert chatbench.floor_ms(200, 6.38) == 1.28


def test_memory_per_member_runs_from_the_first_step_to_the_last() -> None:
    steps = [
        {"clients": 1000, "rss_mib": 30.0},
        {"clients": 5000, "rss_mib": 35.0},
        {"clients": 10000, "rss_mib": 48.0},
    ]
    assert chatbench.per_member_kib(steps) == round(18 * 1024 / 9000, 2)
    assert chatbench.per_member_kib(steps[:1]) == 0.0


class _Stat:
    def __init__(self, frames: list[tuple[str, int]], size: int, count: int) -> None:
        self.traceback = [_Frame(f, n) for f, n in frames]  # outermost first
        self.size_diff = size
        self.count_diff = count


class _Frame:
    def __init__(self, filename: str, lineno: int) -> None:
        self.filename = filename
        self.lineno = lineno


def test_a_member_s_memory_is_put_under_what_allocated_it() -> None:
    sock = str(ROOT / "chatd" / "server" / "server.py"), "/usr/lib/python3.11/socket.py"
    framing = str(ROOT / "chatd" / "wire" / "framing.py")
    stats = [
        _Stat([(sock[0], 1), (framing, 10)], 3000, 30),
        _Stat([(sock[0], 1), (framing, 20)], 1000, 10),
        _Stat([("/x/elsewhere.py", 7)], 500, 10),
        _Stat([("/x/elsewhere.py", 9)], -400, -1),  # freed: not counted
    ]
    rows = member_memory.breakdown(stats, members=10)  # type: ignore[arg-type]
    assert rows == [
        {"what": "frame decoder", "bytes": 400, "blocks": 4.0},
        {"what": "other (elsewhere.py:7)", "bytes": 50, "blocks": 1.0},
    ]
