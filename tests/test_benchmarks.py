"""The benchmark scripts run end to end on the real MovieLens subset and write the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_movielens_table_writes_the_documented_json(ml_2998_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "movielens_table.py"), "--data", str(ml_2998_dir),
         "--out", str(out), "--rounds", "2", "--centralized-epochs", "1", "--no-ablation"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert set(table["rows"]) >= {"fedrecon", "fedavg", "centralized"}
    for row in table["rows"].values():
        assert 0.5 < row["rmse"] < 4.0 and 0.0 < row["accuracy"] < 1.0
        assert row["test_examples"] > 10_000  # all 300 unseen test users are scored
    assert table["seconds_per_round"]["fedrecon"] > 0
    assert table["config"]["rounds"] == 2
