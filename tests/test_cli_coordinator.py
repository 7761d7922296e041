"""The coordinator's commands as a user runs them: ``serve`` in its own process, then ``client``, ``status``,
``export`` and ``simulate --init-model`` against it, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import ModelFile
from fedrecon.server.process import CoordinatorProcess

TASK = """
name = "synthetic"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 8
use_biases = true
initial_offset = 3.5858
[rounds]
clients_per_round = 6
over_selection = 1.0
min_reports = 6
selection_timeout_s = 60.0
reporting_timeout_s = 60.0
retry_delay_s = [0.05, 0.2]
max_rounds = 2
max_check_ins_per_minute = 1200.0  # clients honouring 0.05 s retry windows between rounds
"""


def test_serve_client_status_export_and_sigterm(tmp_path: Path) -> None:
    task = tmp_path / "task.toml"
    task.write_text(TASK)
    store = f"sqlite:///{tmp_path / 'fedrecon.db'}"
    server = CoordinatorProcess(task, store, tmp_path)
    try:
        runner = CliRunner()
        ran = runner.invoke(app, ["client", "--task", "synthetic", "--data", "synthetic", "--users", "6",
                                  "--rounds", "2", "--coordinator", server.address])
        assert ran.exit_code == 0, ran.output
        assert "accepted 12" in ran.output

        status = runner.invoke(app, ["status", "--store", store, "--json"])
        assert status.exit_code == 0, status.output
        (info,) = json.loads(status.output)["tasks"]
        assert info["latest_version"] == 2 and info["rounds"]["committed"] == 2
        assert [r["accepted"] for r in info["recent_rounds"]] == [6, 6]
        assert "pseudonym_salt" not in info["spec"]
        human = runner.invoke(app, ["status", "--store", store])
        assert human.exit_code == 0 and "model version 2" in human.output

        exported = tmp_path / "model.npz"
        done = runner.invoke(app, ["export", "--store", store, "--task", "synthetic", "--out", str(exported)])
        assert done.exit_code == 0, done.output
        model = ModelFile.load(exported)
        assert model.version == 2 and model.names == ["item_embedding", "item_bias", "global_bias"]
        assert model.arrays[0].shape == (600, 8)
        resumed = runner.invoke(app, ["simulate", "--data", "synthetic", "--rounds", "1", "--factors", "8",
                                      "--biases", "--clients-per-round", "10", "--init-model", str(exported),
                                      "--out", str(tmp_path / "resumed")])
        assert resumed.exit_code == 0, resumed.output
    finally:
        assert server.stop(timeout_s=30) == 0, server.log_text()
    output = server.log_path.read_text()
    assert "shutting down" in output and "stopped at model version 2" in output
    # serve's log: a line per round event, with its figures
    assert "round 1 opened on model version 0: selecting up to 6 clients" in output, output
    assert "round 2: 6 clients selected (the goal)" in output, output
    committed = [line for line in output.splitlines() if "round 2 committed version 2 (goal)" in line]
    assert len(committed) == 1 and "6 reports (6 accepted, 0 refused) of 6 selected" in committed[0], output
    assert "train_loss" in committed[0], output

    # The store outlives the process; a different description under the same task name is refused.
    task.write_text(TASK.replace("num_factors = 8", "num_factors = 9"))
    refused = subprocess.run([sys.executable, "-m", "fedrecon.cli", "serve", "--task", str(task), "--store",
                              store, "--port", "0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "different description" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
