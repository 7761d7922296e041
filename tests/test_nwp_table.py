"""``benchmarks/nwp_table.py`` end to end, small: synthetic speakers, a tiny model, two rounds per variant,
bytes counted on a real coordinator's loopback connections. Checks the issue's JSON shape, not accuracy
(two rounds of a tiny model learn little)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {"fedavg", "fedavg_finetune", "fedrecon_local_oov", "fedrecon_personal_layer"}


def test_nwp_table_writes_the_issues_json_with_measured_bytes(tmp_path: Path) -> None:
    out = tmp_path / "nwp.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "nwp_table.py"), "--data", "synthetic", "--out", str(out),
         "--rounds", "2", "--tune-rounds", "1", "--client-lrs", "0.5", "--recon-lrs", "0.5",
         "--finetune-lrs", "0.5", "--clients-per-round", "3", "--vocab", "60", "--oov-buckets", "5",
         "--embedding", "8",
         "--hidden", "8", "--byte-clients", "2", "--evaluations", "1", "--max-examples", "32"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert set(table) >= {"rows", "reconstruction_steps", "seconds_per_round", "config", "machine"}
    assert set(table["rows"]) == ROWS and set(table["seconds_per_round"]) == ROWS
    for row in table["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["download_bytes_per_client"] > 0 and row["upload_bytes_per_client"] > 0
    rows = table["rows"]
    # The locals never travel up: FedRecon uploads no more than FedAvg (the same global delta; 0.5% for what
    # varies between any two reports: varint-coded counts and metrics, HTTP/2 header compression).
    for variant in ("fedrecon_local_oov", "fedrecon_personal_layer"):
        assert rows[variant]["upload_bytes_per_client"] <= rows["fedavg"]["upload_bytes_per_client"] * 1.005
        assert set(table["reconstruction_steps"][variant]) == {"0", "1", "5", "default"}
        assert all(0.0 <= a <= 1.0 for a in table["reconstruction_steps"][variant].values())
    assert set(table["reconstruction_steps"]) == {"fedrecon_local_oov", "fedrecon_personal_layer"}
    # 254 global parameters of 4 bytes at least go down to every client.
    params = table["config"]["model"]["parameters"]
    assert rows["fedavg"]["download_bytes_per_client"] > 4 * params["fedavg"]["global"]
    assert params["fedavg"]["local"] == 0 and params["fedrecon_personal_layer"]["local"] > 0
    speakers = table["config"]["speakers"]
    assert speakers["validation"] >= 1 and speakers["test"] >= 1
    assert table["machine"]["cpus"] >= 1


def test_nwp_central_keeps_the_epoch_of_lowest_validation_loss(tmp_path: Path) -> None:
    """``benchmarks/nwp_central.py`` (the table's model trained centrally, the ceiling the table is read
    against), small: every epoch scored on validation, the lowest-loss one kept and scored on test."""
    out = tmp_path / "central.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "nwp_central.py"), "--data", "synthetic",
         "--out", str(out), "--epochs", "3", "--vocab", "60", "--oov-buckets", "5", "--embedding", "8",
         "--hidden", "8", "--max-examples", "32"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    losses = [e["validation_loss"] for e in result["epochs"]]
    assert len(losses) == 3 and result["selected_epoch"] == 1 + losses.index(min(losses))
    assert 0.0 <= result["test"]["accuracy"] <= 1.0 and result["test"]["num_examples"] > 0
    assert result["config"]["parameters"]["local"] == 0  # the all-global model, as the table's FedAvg row
