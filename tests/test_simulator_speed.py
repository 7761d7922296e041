"""benchmarks/simulator_speed.py runs end to end on the real MovieLens subset and writes the documented
JSON, keeping the keys another benchmark wrote into the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_simulator_speed_writes_wall_and_cpu_per_round_and_keeps_other_keys(ml_2998_dir: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    out.write_text(json.dumps({"ray": {"workers_1": 1.0}, "stale": 1}))  # ray: simulator_scale.py's key
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "simulator_speed.py"), "--data", str(ml_2998_dir),
         "--rounds", "2", "--one-by-one-rounds", "1", "--tff-rounds", "0", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for path in ("fedrecon", "previous_path"):
        assert result["seconds_per_round"][path] > 0
        assert result["first_round_seconds"][path] > 0
        # CPU of every thread of the process: packing and TensorFlow's threads run beside the round
        assert 0 < result["cpu_seconds_per_round"][path] < 60
    runs = result["runs_seconds_per_round"]["fedrecon"]  # one in process, one in a fresh process
    assert len(runs) == 2 and all(r > 0 for r in runs)
    assert result["seconds_per_round"]["fedrecon"] == pytest.approx(sum(runs) / 2)  # their median
    assert result["runs_seconds_per_round"]["reference"] is None and result["reference"] is None
    assert result["seconds_per_round"]["one_client_at_a_time"] > 0
    assert result["seconds_per_round"]["tff"] is None and "--tff-rounds 0" in result["tff_missing"]
    assert result["speedup_vs_previous_path"] == (result["seconds_per_round"]["previous_path"]
                                                  / result["seconds_per_round"]["fedrecon"])
    assert result["ray"] == {"workers_1": 1.0} and "stale" not in result
    assert "CPU" in proc.stdout
