"""Same seeds, same selection: a simulation through a real coordinator equals the in-process simulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.core.nextword import NextWordSizes, nextword_model
from fedrecon.simulations.grpc_transport import GrpcRounds
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings
from fedrecon.simulations.text import split_texts, synthetic_texts, text_description


def _in_process_and_over_grpc(model, config, train, settings):  # type: ignore[no-untyped-def]
    """The same rounds from the same start, run by the in-process simulator and through a real coordinator
    over gRPC: (start, in-process state, gRPC state, gRPC history, the coordinator's stored rounds)."""
    algorithm = FedRecon(model, config)
    start = algorithm.initial_state(settings.seed)
    local, _ = Simulation(algorithm, train, settings).run(start, keep_best=False)
    with GrpcRounds(model, config, train, settings) as rounds:
        remote, history = Simulation(algorithm, train, settings, round_runner=rounds).run(
            start, keep_best=False)
        stored = rounds.store.list_rounds("simulation")
    return start, local, remote, history, stored


def test_grpc_rounds_equal_in_process_rounds_on_movielens(ml_2998_dir: Path) -> None:
    data = load_dataset(str(ml_2998_dir), seed=42)
    model = MatrixFactorization(data.num_items, 20, use_biases=True, initial_offset=data.mean_rating)
    # An adaptive server optimizer: its state must evolve identically on both sides too.
    config = FedReconConfig(server_optimizer=OptimizerSpec("adam", 0.01))
    settings = SimulationSettings(rounds=4, clients_per_round=20, batch_size=5, seed=3)
    start, local, remote, history, stored = _in_process_and_over_grpc(model, config, data.train, settings)
    assert [r.num_accepted for r in stored] == [20] * 4
    assert [r.num_clients for r in history.rounds] == [20] * 4
    moved = max(float(np.abs(a - b).max()) for a, b in zip(local.globals, start.globals, strict=True))
    assert moved > 1e-3  # training changed the model, so agreement below is not trivial
    for a, b in zip(local.globals, remote.globals, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_grpc_rounds_equal_in_process_rounds_when_clients_shuffle_each_round() -> None:
    """With ``shuffle_each_round`` and one-step phases (so the order decides what a client trains on), the
    devices behind the coordinator are handed the simulator's (seed, round, user) order: the same model
    within 1e-5, and a different one from the same rounds unshuffled."""
    data = load_dataset("synthetic", seed=42)
    model = MatrixFactorization(data.num_items, 8, use_biases=True, initial_offset=data.mean_rating)
    config = FedReconConfig(recon_epochs=1, recon_steps_max=1, post_recon_epochs=1, post_recon_steps_max=1,
                            shuffle_each_round=True)
    settings = SimulationSettings(rounds=3, clients_per_round=10, batch_size=5, seed=3)
    start, local, remote, _, stored = _in_process_and_over_grpc(model, config, data.train, settings)
    assert [r.num_accepted for r in stored] == [10] * 3
    unshuffled = FedRecon(model, config.replace(shuffle_each_round=False))
    fixed_order, _ = Simulation(unshuffled, data.train, settings).run(start, keep_best=False)
    order_matters = max(float(np.abs(a - b).max())
                        for a, b in zip(local.globals, fixed_order.globals, strict=True))
    assert order_matters > 1e-3  # shuffling changed what was trained on, so agreement is not trivial
    difference = max(float(np.abs(a - b).max()) for a, b in zip(local.globals, remote.globals, strict=True))
    print(f"shuffled: order changed the model by {order_matters:.4g}, in-process/grpc difference "
          f"{difference:.3g}")
    assert difference <= 1e-5


def test_simulate_command_with_grpc_transport(tmp_path: Path) -> None:
    args = ["simulate", "--data", "synthetic", "--rounds", "2", "--clients-per-round", "10", "--factors", "8",
            "--eval-every", "2", "--out", str(tmp_path)]
    local = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "local")])
    remote = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "grpc"), "--transport", "grpc"])
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    a = json.loads((tmp_path / "local" / "metrics.json").read_text())
    b = json.loads((tmp_path / "grpc" / "metrics.json").read_text())
    assert (a["transport"], b["transport"]) == ("inprocess", "grpc")
    assert abs(a["test"]["rmse"] - b["test"]["rmse"]) < 1e-4


@pytest.mark.parametrize("variant", ["personal_layer", "local_oov"])
def test_grpc_rounds_equal_in_process_rounds_for_next_word_prediction(variant: str) -> None:
    """The Keras next-word model (a local adapter, or local OOV embeddings drawn from the round's seeds):
    the devices rebuild it from the task's description, and three rounds of four synthetic speakers
    through the coordinator (adam on the server) end where the in-process simulator does."""
    data = split_texts(synthetic_texts(num_users=16, words_per_user=200, vocabulary=30, seed=1),
                       vocab_size=20, seq_len=6, oov_buckets=4, min_words=50, max_examples_per_user=24)
    sizes = NextWordSizes(data.vocabulary.size, seq_len=6, embedding=8, hidden=8, oov_buckets=4)
    model = nextword_model(sizes, variant, accuracy_excludes=data.vocabulary.accuracy_excludes())
    config = FedReconConfig(reconstruction_optimizer=OptimizerSpec("sgd", 0.5),
                            client_optimizer=OptimizerSpec("sgd", 0.5),
                            server_optimizer=OptimizerSpec("adam", 0.01), recon_epochs=1, recon_steps_max=2,
                            post_recon_epochs=1, post_recon_steps_max=2)
    settings = SimulationSettings(rounds=3, clients_per_round=4, batch_size=4, seed=3)
    start, local, remote, _, stored = _in_process_and_over_grpc(model, config, data.train, settings)
    assert [r.num_accepted for r in stored] == [4] * 3
    moved = max(float(np.abs(a - b).max()) for a, b in zip(local.globals, start.globals, strict=True))
    assert moved > 1e-3  # training changed the model, so agreement below is not trivial
    difference = max(float(np.abs(a - b).max()) for a, b in zip(local.globals, remote.globals, strict=True))
    print(f"{variant}: moved {moved:.4g}, largest in-process/grpc difference {difference:.3g}")
    assert difference <= 1e-5


def test_simulate_command_with_grpc_transport_on_a_next_word_task(tmp_path: Path) -> None:
    """``fedrecon simulate --config`` a Keras next-word task file (architecture and vocabulary files, as
    deploy/tasks/nextword.toml has them; small here) on synthetic text: in process and ``--transport grpc``
    write the same model, within 1e-5, with each device's sequences shuffled every round (as nextword.toml
    does)."""
    texts = synthetic_texts()  # what `--data synthetic` reads for a text task
    vocabulary = split_texts(texts, vocab_size=40, seq_len=6, oov_buckets=4).vocabulary
    sizes = NextWordSizes(vocabulary.size, seq_len=6, embedding=8, hidden=8, oov_buckets=4)
    model = nextword_model(sizes, "personal_layer", accuracy_excludes=vocabulary.accuracy_excludes())
    (tmp_path / "tiny.json").write_text(model.keras_model.to_json())
    (tmp_path / "tiny.words").write_text("\n".join(text_description(vocabulary, 6)["words"]) + "\n")
    excludes = list(vocabulary.accuracy_excludes())
    (tmp_path / "tiny.toml").write_text(f"""
name = "tiny-nextword"
batch_size = 4
[model]
kind = "keras"
architecture = "tiny.json"
local_layers = ["adapter"]
objective = {{ name = "sparse_categorical_crossentropy", pad_id = 0, accuracy_excludes = {excludes} }}
text = {{ vocabulary = "tiny.words", seq_len = 6, oov_buckets = 4 }}
[training]
server_optimizer = {{ name = "adam", learning_rate = 0.01 }}
recon_epochs = 1
recon_steps_max = 2
post_recon_epochs = 1
post_recon_steps_max = 2
shuffle_each_round = true
[rounds]
clients_per_round = 4
""")
    args = ["simulate", "--config", str(tmp_path / "tiny.toml"), "--data", "synthetic", "--rounds", "2",
            "--eval-every", "2"]
    local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    remote = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "grpc"), "--transport", "grpc"])
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert "48 training, 6 validation, 6 unseen test users" in local.output, local.output
    a = np.load(tmp_path / "local" / "model.npz")
    b = np.load(tmp_path / "grpc" / "model.npz")
    names = [n for n in a.files if n != "__meta__"]
    assert "logits/kernel" in names and "adapter/kernel" not in names  # the globals, never the adapter
    difference = max(float(np.abs(a[n] - b[n]).max()) for n in names)
    print(f"simulate in process vs --transport grpc: largest difference {difference:.3g}")
    assert difference <= 1e-5
    metrics = json.loads((tmp_path / "grpc" / "metrics.json").read_text())
    assert metrics["transport"] == "grpc" and set(metrics["test"]) >= {"loss", "accuracy"}
