"""Short simulations: learning happens, baselines run, the CLI writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import ModelFile
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings


def test_short_simulation_lowers_validation_loss_on_synthetic_data() -> None:
    data = load_dataset("synthetic")
    model = MatrixFactorization(data.num_items, 20, use_biases=True, initial_offset=data.mean_rating)
    algorithm = FedRecon(model, FedReconConfig())
    sim = Simulation(algorithm, data.train, SimulationSettings(rounds=60, clients_per_round=50))
    state = algorithm.initial_state(0)
    before = sim.evaluate(state, data.validation)
    for _ in range(60):
        state, record = sim.run_round(state)
        assert record.num_clients == 50 and np.isfinite(record.train_loss)
    after = sim.evaluate(state, data.validation)
    assert after["mse"] < 0.85 * before["mse"], (before, after)
    assert after["num_examples"] == before["num_examples"] > 0


def test_selection_and_rounds_are_reproducible() -> None:
    data = load_dataset("synthetic")
    results = []
    for _ in range(2):
        model = MatrixFactorization(data.num_items, 10)
        algorithm = FedRecon(model, FedReconConfig())
        sim = Simulation(algorithm, data.train, SimulationSettings(rounds=3, clients_per_round=20, seed=5))
        state = algorithm.initial_state(5)
        for _ in range(3):
            state, _ = sim.run_round(state)
        results.append(state.globals[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_cli_simulate_writes_metrics_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--rounds", "6", "--clients-per-round", "20",
                                      "--factors", "8", "--eval-every", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algorithm"] == "fedrecon"
    assert [m["round"] for m in metrics["validation"]] == [3, 6]
    assert 0 < metrics["test"]["rmse"] < 5 and 0 <= metrics["test"]["accuracy"] <= 1
    assert len(metrics["train_loss"]) == 6
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert "unseen test users" in result.output
    # The selected model, in the export format (loads into serve --init-model and the client library).
    exported = ModelFile.load(out / "model.npz")
    assert exported.version == metrics["selected"]["round"] and exported.names == ["item_embedding"]
    assert exported.arrays[0].shape == (600, 8) and exported.model_spec["local_init"] == "uniform"


def test_cli_baselines_run(tmp_path: Path) -> None:
    for algorithm, extra in (("fedavg", ["--rounds", "4"]), ("centralized", ["--centralized-epochs", "2"])):
        out = tmp_path / algorithm
        result = CliRunner().invoke(app, ["simulate", "--algorithm", algorithm, "--factors", "8",
                                          "--clients-per-round", "20", "--eval-every", "2", "--out", str(out),
                                          *extra])
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["algorithm"] == algorithm
        assert metrics["test"]["num_examples"] > 0 and np.isfinite(metrics["test"]["rmse"])


def test_local_init_modes() -> None:
    """uniform: a draw per client; shared: one draw for all (what TFF does); zeros: no draw."""
    starts = {}
    for mode in ("uniform", "shared", "zeros"):
        model = MatrixFactorization(30, 4, use_biases=True, local_init=mode)
        starts[mode] = [model.initial_locals(np.random.default_rng(seed))[0] for seed in (1, 2)]
    assert not np.array_equal(*starts["uniform"])
    np.testing.assert_array_equal(*starts["shared"])
    assert 0 < np.abs(starts["shared"][0]).max() <= 0.05
    assert not np.any(starts["zeros"][0]) and not np.any(starts["zeros"][1])
    with pytest.raises(ValueError, match="local_init"):
        MatrixFactorization(30, 4, local_init="gaussian")


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "fedavg"], "runs the fedrecon algorithm"),
    (["--transport", "grpc"], "runs the fedrecon algorithm in process"),
    (["--local-init", "uniform"], "local_init 'shared'"),
])
def test_cli_tff_backend_refuses_what_tff_cannot_run(tmp_path: Path, args: list[str], message: str) -> None:
    # Refused before any TFF process starts, so this needs no TFF environment.
    result = CliRunner().invoke(app, ["simulate", "--backend", "tff", "--rounds", "1", "--factors", "4",
                                      "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "metrics.json").exists()


def test_the_learning_curve_plot_says_which_round_was_kept_and_its_test_result(tmp_path: Path) -> None:
    from fedrecon.simulations.plotting import plot_learning_curves

    summary = {"algorithm": "fedrecon", "train_loss": [4.0, 2.0, 1.5, 1.2],
               "validation": [{"round": 2, "rmse": 1.1, "accuracy": 0.3},
                              {"round": 4, "rmse": 1.0, "accuracy": 0.35}],
               "selected": {"round": 4}, "test": {"rmse": 0.9876, "accuracy": 0.4321}}
    said = plot_learning_curves(summary, tmp_path / "curves.png")
    assert said[0] == ("fedrecon: unseen test users RMSE 0.9876, accuracy 43.21% (round 4, chosen on "
                       "validation)")
    assert said[1:] == ["training MSE (clients' post-reconstruction)", "selected round 4",
                        "validation RMSE", "validation accuracy", "selected round 4"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("xla", [False, True])
def test_packing_the_next_round_ahead_changes_nothing(xla: bool) -> None:
    """Rounds whose clients were packed on the background thread while the round before trained equal
    rounds packed on the spot by a fresh simulation (nothing packed ahead), bit for bit."""
    data = load_dataset("synthetic")
    algorithm = FedRecon(MatrixFactorization(data.num_items, 8), FedReconConfig())
    settings = SimulationSettings(clients_per_round=30, xla=xla)
    ahead = Simulation(algorithm, data.train, settings)
    state_ahead = state_fresh = algorithm.initial_state(0)
    for _ in range(3):
        state_ahead, record_ahead = ahead.run_round(state_ahead)
        fresh = Simulation(algorithm, data.train, settings)
        state_fresh, record_fresh = fresh.run_round(state_fresh)
        fresh.close()
        assert record_ahead.train_loss == record_fresh.train_loss
        for a, b in zip(state_ahead.globals, state_fresh.globals, strict=True):
            np.testing.assert_array_equal(a, b)
    assert ahead._next is not None and ahead._next[0] == 4  # round 4 was packed ahead
    ahead.close()
    assert ahead._next is None


def test_shuffle_each_round_varies_a_capped_clients_batches_and_keeps_its_examples() -> None:
    """With a step cap below a client's batches, an unshuffled client trains on the same first batches every
    round; ``shuffle_each_round`` draws a new order per round (the same for the same seed and round).
    Evaluation packs never shuffle."""
    from fedrecon.core.batching import ClientExamples
    from fedrecon.simulations.runner import pack_group

    client = ClientExamples(x=np.arange(40, dtype=np.int32).reshape(40, 1) % 4,
                            y=np.arange(40, dtype=np.float32))
    settings = SimulationSettings(batch_size=5)

    def first_batch(round_num: int, shuffle: bool) -> list[float]:
        config = FedReconConfig(split_dataset=False, post_recon_steps_max=1, shuffle_each_round=shuffle)
        algorithm = FedRecon(MatrixFactorization(4, 2), config)
        packed = pack_group(algorithm, [client], [3], settings=settings, round_num=round_num)
        return sorted(packed.post_reconstruction.y[0, 0].tolist())

    assert first_batch(1, False) == first_batch(2, False) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert first_batch(1, True) != first_batch(2, True)
    assert first_batch(1, True) == first_batch(1, True)
    assert set(first_batch(1, True)) <= set(client.y.tolist())
    shuffling = FedRecon(MatrixFactorization(4, 2), FedReconConfig(shuffle_each_round=True))
    sim = Simulation(shuffling, {}, settings)
    held_out = [sim.evaluate_sums(shuffling.initial_state(0), {3: client}) for _ in range(2)]
    assert held_out[0] is not None and held_out[1] is not None
    assert held_out[0].squared_error == held_out[1].squared_error  # the same held-out batches, unshuffled
