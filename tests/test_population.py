"""A synthetic population generated per user on demand: deterministic by id, only sampled users made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import ClientExamples
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.simulations.population import Population, SyntheticUsers, population_size
from fedrecon.simulations.ratings import load_dataset
from fedrecon.simulations.runner import Simulation, SimulationSettings, choose_clients


def test_a_user_is_the_same_whoever_generates_it_and_in_any_order() -> None:
    a, b = SyntheticUsers(seed=3), SyntheticUsers(seed=3)
    later = [b.user(u) for u in (999_999, 17, 5)]  # another object, another order
    for u, other in zip((999_999, 17, 5), later, strict=True):
        mine = a.user(u)
        np.testing.assert_array_equal(mine.x, other.x)
        np.testing.assert_array_equal(mine.y, other.y)
    assert not np.array_equal(a.user(17).y[:20], a.user(18).y[:20])  # users differ
    assert not np.array_equal(SyntheticUsers(seed=4).user(17).x, a.user(17).x)  # seeds differ


def test_users_look_like_the_embedded_dataset() -> None:
    users = SyntheticUsers(seed=0)
    sizes = []
    for u in range(1, 301):
        e = users.user(u)
        assert 20 <= len(e) <= 300
        assert len(np.unique(e.x)) == len(e.x)  # an item is rated once
        assert e.x.dtype == np.int32 and e.x.min() >= 0 and e.x.max() < users.num_items
        assert set(np.unique(e.y)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        sizes.append(len(e))
    assert 40 < np.median(sizes) < 90  # log-normal around 60


def test_a_million_users_cost_no_memory_per_user() -> None:
    data = load_dataset("population:1_000_000")
    assert isinstance(data.train, Population) and len(data.train) == 1_000_000
    assert data.train.user_ids == range(1, 1_000_001)
    assert 1_000_000 in data.train and 0 not in data.train and 1_000_001 not in data.train
    assert len(data.validation) == len(data.test) == 1000
    assert not set(data.validation) & set(data.test) and min(data.validation) == 1_000_001
    assert 1.0 < data.mean_rating < 5.0
    with pytest.raises(KeyError):
        data.train[0]


@pytest.mark.parametrize("source", ["population:", "population:x", "population:0"])
def test_bad_population_sizes_are_refused(source: str) -> None:
    with pytest.raises(ValueError, match="population"):
        population_size(source)


class CountingPopulation(Population):
    """Counts the users a run materialises."""

    looked_up: list[int]

    def __getitem__(self, user_id: int) -> ClientExamples:
        self.looked_up.append(user_id)
        return super().__getitem__(user_id)


def test_a_round_materialises_only_its_sampled_clients() -> None:
    users = SyntheticUsers(seed=0)
    population = CountingPopulation(users, range(1, 1_000_001))
    population.looked_up = []
    model = MatrixFactorization(users.num_items, 8)
    algorithm = FedRecon(model, FedReconConfig())
    settings = SimulationSettings(clients_per_round=40)
    sim = Simulation(algorithm, population, settings)
    state = algorithm.initial_state(0)
    for _ in (1, 2):
        state, record = sim.run_round(state)
        assert record.num_clients == 40 and np.isfinite(record.train_loss)
    sim.close()
    # Each round's clients are looked up once, in order; the next round's are packed while a round trains,
    # so after two rounds the third's are materialised too, or not at all if closing cancelled them first.
    rounds = [choose_clients(population.user_ids, settings, r) for r in (1, 2, 3)]
    assert len(set(rounds[0])) == 40
    assert population.looked_up in (rounds[0] + rounds[1], rounds[0] + rounds[1] + rounds[2])


def test_cli_simulates_a_population(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--data", "population:800", "--rounds", "2",
                                      "--clients-per-round", "20", "--factors", "8", "--eval-every", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "population:800" and len(metrics["train_loss"]) == 2
    assert metrics["test"]["num_examples"] > 0 and np.isfinite(metrics["test"]["rmse"])


def test_a_population_is_refused_where_it_would_be_materialised(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--data", "population:800", "--transport", "grpc",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "would materialise every user" in result.output
