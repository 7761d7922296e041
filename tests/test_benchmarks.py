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


def test_coordinator_load_smoke_writes_the_documented_json(tmp_path: Path) -> None:
    """Five clients, one round, on the embedded synthetic data: a real coordinator process and store."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "coordinator_load.py"), "--data", "synthetic",
         "--clients", "5", "--rounds", "1", "--factors", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert {"clients", "rounds", "reports_per_s", "seconds_per_round", "download_bytes_per_client",
            "upload_bytes_per_client", "whole_model_bytes", "peak_rss_mb"} <= set(run)
    assert run["clients"] == 5 and run["rounds"] == 1 and run["rounds_committed"] == 1
    assert run["reports_per_s"] > 0 and run["seconds_per_round"] > 0
    globals_bytes = (600 * 9 + 1) * 4  # 600 synthetic items, 8 factors + item bias, global offset
    assert run["global_bytes"] == globals_bytes
    assert run["whole_model_bytes"] == globals_bytes + 960 * 9 * 4  # + every training user's locals
    # Each way a client moves the global variables plus framing, never the whole model.
    for moved in (run["download_bytes_per_client"], run["upload_bytes_per_client"]):
        assert globals_bytes <= moved < globals_bytes + 2000
    assert run["peak_rss_mb"] >= run["startup_rss_mb"] > 10


def test_fault_drill_loses_nothing(tmp_path: Path) -> None:
    """The scripted drill (kill, dropouts, hostile messages, late reports) against a live coordinator."""
    out = tmp_path / "drill.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_drill.py"), "--bad-messages",
                           "30", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    drill = json.loads(out.read_text())
    assert drill["updates_lost"] == 0 and drill["versions_verified"] is True
    # 2 normal + dropouts + the round after the flood + late + the round after the kill commit; the killed
    # round fails, and so does mallory's round if the flood outlasts its selection window (timing).
    assert drill["rounds_committed"] == 6 and drill["rounds_failed"] in (1, 2)
    # At least the 4 reports acknowledged in the killed round are in no committed version.
    assert drill["reports_folded_in_committed_rounds"] <= drill["reports_accepted"] - 4
    refused = drill["reports_refused"]
    assert not [k for k in refused if k.startswith("NOT REFUSED")]
    assert refused["late"] == 3 and refused["oversized: RESOURCE_EXHAUSTED"] == 3
    assert refused["local variable: INVALID_ARGUMENT"] == 3
