"""User-level DP in the coordinator: noise on each round's sum, ε per committed round in the store and in
``fedrecon status``, and a budget past which no round opens, across a restart.

Hand-checkable numbers: clients send zero deltas, so the committed change of the model *is* the noise on the
mean, N(0, (z·clip/K)²) per coordinate with the server's SGD at learning rate 1; and two Gaussian releases
with multiplier z compose (in RDP, exactly) to one release with multiplier z/√2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.privacy import PrivacyParameters, Sampling
from fedrecon.protocol import Assignment, RetryLater
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import PrivacySettings, RoundSettings, TaskSpec

ITEMS, FACTORS, K, Z, CLIP = 1000, 4, 2, 1.5, 0.5
MODEL = {"kind": "matrix_factorization", "num_items": ITEMS, "num_factors": FACTORS}


def _task(**privacy: object) -> TaskSpec:
    return TaskSpec(
        name="private", model=MODEL,
        rounds=RoundSettings(clients_per_round=K, over_selection=1.0, min_reports=K),
        training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0)),
        aggregation=AggregationConfig(weighting="uniform", max_update_norm=CLIP, norm_policy="clip",
                                      noise_multiplier=Z),
        privacy=PrivacySettings(**privacy))  # type: ignore[arg-type]


def _round(c: Coordinator, n: int) -> None:
    """K clients report zero deltas; the round commits at its goal."""
    for i in range(K):
        client = f"user-{n}-{i}"
        a = c.check_in("private", client, 1)
        assert isinstance(a, Assignment), a
        c.report("private", client, a.round_id, a.token, 3.0, {"post_recon_examples": 3.0},
                 [np.zeros((ITEMS, FACTORS), np.float32)])


def test_a_task_states_its_accounting() -> None:
    noisy = TaskSpec(name="t", model=MODEL, aggregation=AggregationConfig(
        weighting="uniform", max_update_norm=1.0, norm_policy="clip", noise_multiplier=1.0))
    assert noisy.privacy == PrivacySettings()  # noise is never unaccounted: defaults filled in
    assert TaskSpec.from_dict(noisy.to_dict()) == noisy
    assert TaskSpec(name="t", model=MODEL).to_dict().get("privacy") is None  # old descriptions unchanged
    with pytest.raises(ValueError, match="sets no noise_multiplier"):
        TaskSpec(name="t", model=MODEL, privacy=PrivacySettings())
    with pytest.raises(ValueError, match="PLD accountant supports Poisson sampling only"):
        _task(population=1000, accountant="pld")
    with pytest.raises(ValueError, match="bad task description"):
        TaskSpec.from_dict({**noisy.to_dict(), "privacy": {"epsilon": 3}})


def test_noise_epsilon_per_round_and_the_budget_across_a_restart(tmp_path: Path) -> None:
    one = PrivacyParameters(Z, K, K, sampling=Sampling.POISSON).epsilon_after(1)
    two = PrivacyParameters(Z, K, K, sampling=Sampling.POISSON).epsilon_after(2)
    three = PrivacyParameters(Z, K, K, sampling=Sampling.POISSON).epsilon_after(3)
    # No amplification (q = 1): two releases at z are one release at z / sqrt(2).
    assert two == pytest.approx(PrivacyParameters(Z / math.sqrt(2), K, K).epsilon_after(1), rel=1e-6)
    task = _task(epsilon_budget=(two + three) / 2)  # two rounds fit, the third would not
    url = f"sqlite:///{tmp_path / 'store.db'}"
    clock = ManualClock()
    with SqlStore(url) as store:
        c = Coordinator(store, task, clock=clock, replica_id="node-1")
        before = c.model_arrays("private", 0)[1][0]
        _round(c, 1)
        assert c.version == 1
        change = c.model_arrays("private", 1)[1][0] - before
        # Zero deltas: the change is the noise on the mean, std z * clip / K (4,000 draws: within 10%).
        assert np.std(change) == pytest.approx(Z * CLIP / K, rel=0.1)
        assert abs(float(np.mean(change))) < 0.1 * Z * CLIP / K
        _round(c, 2)
        assert [r.metrics["epsilon"] for r in store.list_rounds("private")] == pytest.approx([one, two])
        refused = c.check_in("private", "user-3-0", 1)
        assert isinstance(refused, RetryLater) and "privacy budget is spent" in refused.reason
        assert len(store.list_rounds("private")) == 2  # no round was opened

    with SqlStore(url) as store:  # a restarted coordinator counts the committed rounds again
        again = Coordinator(store, task, clock=clock, replica_id="node-1")  # restarted
        assert again.ledger is not None and again.ledger.rounds == 2
        assert again.ledger.epsilon == pytest.approx(two)
        assert isinstance(again.check_in("private", "user-4-0", 1), RetryLater)

    status = CliRunner().invoke(app, ["status", "--store", url, "--json"])
    assert status.exit_code == 0, status.output
    (info,) = json.loads(status.output)["tasks"]
    assert info["privacy"]["epsilon"] == pytest.approx(two) and info["privacy"]["rounds_accounted"] == 2
    assert info["privacy"]["noise_multiplier"] == Z and info["privacy"]["population"] is None
    stages = ["uniform_weights", "norm_clip", "gaussian_sum"]  # what ran, recorded with each round
    assert [r["stages"] for r in info["recent_rounds"]] == [stages, stages]
    human = CliRunner().invoke(app, ["status", "--store", url])
    assert f"privacy: epsilon {two:.4g} of the budget" in human.output, human.output


def test_a_stated_population_amplifies_and_costs_less(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        c = Coordinator(store, _task(population=1000), clock=ManualClock())
        _round(c, 1)
        (record,) = store.list_rounds("private")
        sampled = PrivacyParameters(Z, 1000, K, sampling=Sampling.FIXED).epsilon_after(1)
        assert record.metrics["epsilon"] == pytest.approx(sampled)
        assert sampled < PrivacyParameters(Z, K, K).epsilon_after(1)
