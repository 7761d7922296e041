"""``fedrecon simulate`` as a user meets it: model files round-trip, defaults that train, one-line errors,
a task file as configuration, and Ctrl-C keeping what was done."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.model_file import FORMAT, ModelFile

SMALL = ["--clients-per-round", "20", "--factors", "8", "--eval-every", "2"]


def _simulate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["simulate", *args])
    return result.exit_code, result.output


def _error_line(output: str) -> str:
    """The run's last printed line (the error), with no traceback anywhere."""
    assert "Traceback" not in output, output
    return output.strip().splitlines()[-1]


def test_a_simulated_model_continues_in_simulate_init_model(tmp_path: Path) -> None:
    code, output = _simulate("--rounds", "2", "--biases", "--out", str(tmp_path / "a"), *SMALL)
    assert code == 0, output
    exported = ModelFile.load(tmp_path / "a" / "model.npz")
    assert exported.meta()["format"] == FORMAT and exported.model_spec["use_biases"] is True
    # The test users' scores per true rating: every scored rating in exactly one row.
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    rows = metrics["test_per_class"]
    assert sum(r["count"] for r in rows) == metrics["test"]["num_examples"] > 0
    assert all(1 <= r["rating"] <= 5 and np.isfinite(r["rmse"]) for r in rows), rows
    assert "per rating: " in output
    # No --biases, no --factors: the model is the file's (item_embedding, item_bias, global_bias).
    code, output = _simulate("--rounds", "2", "--init-model", str(tmp_path / "a" / "model.npz"),
                             "--out", str(tmp_path / "b"), "--clients-per-round", "20", "--eval-every", "2")
    assert code == 0, output
    continued = ModelFile.load(tmp_path / "b" / "model.npz")
    assert continued.names == exported.names == ["item_embedding", "item_bias", "global_bias"]
    assert [a.shape for a in continued.arrays] == [a.shape for a in exported.arrays] == [(600, 8), (600,), ()]


def test_init_model_that_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    code, output = _simulate("--rounds", "2", "--out", str(tmp_path / "a"), *SMALL)
    assert code == 0, output
    code, output = _simulate("--rounds", "2", "--init-model", str(tmp_path / "a" / "model.npz"),
                             "--factors", "16", "--out", str(tmp_path / "b"))
    assert code == 2 and "--factors 16 disagrees with" in _error_line(output), output
    code, output = _simulate("--rounds", "2", "--algorithm", "fedavg", "--init-model",
                             str(tmp_path / "a" / "model.npz"), "--out", str(tmp_path / "b"))
    assert code == 2 and "holds a fedrecon model" in _error_line(output), output


def test_fedavg_trains_with_its_defaults(tmp_path: Path) -> None:
    code, output = _simulate("--algorithm", "fedavg", "--rounds", "20", "--clients-per-round", "50",
                             "--eval-every", "10", "--factors", "20", "--out", str(tmp_path))
    assert code == 0, output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["spec"]["config"]["client_optimizer"]["learning_rate"] == 0.05
    assert all(np.isfinite(loss) for loss in metrics["train_loss"])
    # Synthetic ratings have a standard deviation near 1.1: a diverging run scores far above this.
    assert np.isfinite(metrics["test"]["rmse"]) and metrics["test"]["rmse"] < 1.3, metrics["test"]


def test_a_diverging_run_stops_with_one_line_and_exit_2(tmp_path: Path) -> None:
    code, output = _simulate("--algorithm", "fedavg", "--client-lr", "1e6", "--rounds", "50",
                             "--out", str(tmp_path), *SMALL)
    line = _error_line(output)
    assert code == 2, output
    assert line.startswith("round ") and "not finite" in line and "lower the client learning rate" in line
    assert "--client-lr" in line


def test_task_file_configures_simulate_and_flags_override_it(tmp_path: Path) -> None:
    task = tmp_path / "task.toml"
    task.write_text('name = "sim"\nbatch_size = 4\nseed = 3\n'
                    '[model]\nkind = "matrix_factorization"\nnum_items = 600\nnum_factors = 6\n'
                    'use_biases = true\n'
                    '[training]\nrecon_epochs = 2\nrecon_steps_max = 7\nreconstruction_l2 = 0.01\n'
                    'client_optimizer = { learning_rate = 0.3 }\nshuffle_each_round = true\n'
                    '[rounds]\nclients_per_round = 15\nmax_rounds = 3\n'
                    '[aggregation]\nmax_update_norm = 5.0\n')
    code, output = _simulate("--config", str(task), "--recon-steps-max", "none", "--post-recon-steps-max",
                             "none", "--eval-recon-epochs", "3", "--eval-recon-steps-max", "9",
                             "--server-lr", "0.5", "--eval-every", "3", "--out", str(tmp_path / "run"))
    assert code == 0, output
    spec = json.loads((tmp_path / "run" / "metrics.json").read_text())["spec"]
    assert (spec["num_factors"], spec["use_biases"]) == (6, True)
    assert spec["settings"]["batch_size"] == 4 and spec["settings"]["seed"] == 3
    assert spec["settings"]["clients_per_round"] == 15 and spec["settings"]["rounds"] == 3
    config = spec["config"]
    assert config["recon_epochs"] == 2 and config["reconstruction_l2"] == 0.01
    assert config["recon_steps_max"] is None and config["post_recon_steps_max"] is None  # flags win
    assert (config["eval_recon_epochs"], config["eval_recon_steps_max"]) == (3, 9)
    assert config["client_optimizer"] == {**config["client_optimizer"], "name": "sgd", "learning_rate": 0.3}
    assert config["server_optimizer"]["learning_rate"] == 0.5
    assert config["shuffle_each_round"] is True  # the task's, which no flag overrides here
    assert spec["aggregation"]["max_update_norm"] == 5.0


def test_bad_configuration_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "sim"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                   '[training]\nnope = 1\n')
    code, output = _simulate("--config", str(bad), "--out", str(tmp_path / "run"))
    assert code == 2 and "nope" in _error_line(output), output
    code, output = _simulate("--recon-steps-max", "lots", "--out", str(tmp_path / "run"))
    assert code == 2 and "--recon-steps-max takes a number of steps or 'none'" in _error_line(output)
    bad.write_text('name = "sim"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                   '[training]\nshuffle_each_round = "yes"\n')
    code, output = _simulate("--config", str(bad), "--out", str(tmp_path / "run"))
    assert code == 2 and "shuffle_each_round must be true or false" in _error_line(output), output
    code, output = _simulate("--recon-l2", "0.5", "--shuffle-each-round", "--rounds", "1", "--out",
                             str(tmp_path / "run"), *SMALL)
    assert code == 0, output
    config = json.loads((tmp_path / "run" / "metrics.json").read_text())["spec"]["config"]
    assert config["shuffle_each_round"] is True and config["reconstruction_l2"] == 0.5


def test_bad_data_is_one_line(tmp_path: Path) -> None:
    code, output = _simulate("--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert code == 2 and "no such data folder or ratings file" in _error_line(output), output
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::2::5::0\n1::x::4::0\n")
    code, output = _simulate("--data", str(folder), "--out", str(tmp_path / "run"))
    assert code == 2 and "ratings.dat:2: expected integer user and item ids" in _error_line(output), output
    (folder / "ratings.dat").write_text("".join(f"1::{i}::4::0\n" for i in range(30)))
    code, output = _simulate("--data", str(folder), "--out", str(tmp_path / "run"))
    assert code == 2 and "too few users to split: 1 users" in _error_line(output), output
    # Enough users to split, but every one too small to hold anything out: refused, not "RMSE 0.0000".
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::4::0\n" for u in range(20) for i in range(3)))
    code, output = _simulate("--data", str(folder), "--out", str(tmp_path / "run"))
    assert code == 2 and "nothing would be held out" in _error_line(output), output


def _lines(stream, into: queue.Queue) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        into.put(line)
    into.put(None)


def test_ctrl_c_keeps_metrics_and_the_best_model(tmp_path: Path) -> None:
    command = Path(sys.executable).parent / "fedrecon"
    out = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([str(command), "simulate", "--rounds", "100000", "--eval-every", "1",
                             "--clients-per-round", "10", "--factors", "4", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while not any("validation RMSE" in line for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None and time.monotonic() < deadline, "".join(seen)
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    output = "".join(seen)
    assert code == 130, output
    assert "interrupted after" in output and "model.npz" in output and "Traceback" not in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted_after"] >= 1 and metrics["validation"], metrics
    model = ModelFile.load(out / "model.npz")
    assert model.version == metrics["selected"]["round"] >= 1
    assert model.arrays[0].shape == (600, 4)


@pytest.mark.parametrize("value", ["none", "None", "0", "12"])
def test_no_cap_values_are_accepted(value: str) -> None:
    from fedrecon.cli_simulate import steps_cap

    assert steps_cap(value, "--recon-steps-max") == (None if value.lower() == "none" else int(value))
