"""User-level DP: the accountant's answers, the Gaussian sum stage, and budgeted simulations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedrecon.core.aggregation import (
    AggregationConfig,
    GaussianSum,
    NormPolicy,
    StackedDeltas,
    Weighting,
    build_aggregator,
)
from fedrecon.core.privacy import (
    AccountantKind,
    AccountingError,
    DpOptions,
    PrivacyLedger,
    PrivacyParameters,
    Sampling,
    noise_multiplier_for,
)

DP_AGG = AggregationConfig(weighting=Weighting.UNIFORM, max_update_norm=1.0, noise_multiplier=1.0)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    p = PrivacyParameters(1.0, population=1000, clients_per_round=10, delta=1e-5)
    assert p.epsilon_after(0) == 0.0
    eps = [p.epsilon_after(r) for r in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    noisier = PrivacyParameters(2.0, population=1000, clients_per_round=10, delta=1e-5)
    assert noisier.epsilon_after(100) < eps[2]
    assert PrivacyParameters(0.0, 1000, 10).epsilon_after(1) == math.inf


def test_one_round_without_sampling_matches_the_gaussian_mechanism() -> None:
    """q = 1, one round: the RDP bound of the Gaussian mechanism, ε ≤ 1/(2z²) + sqrt(2 log(1/δ))/z
    (Mironov 2017, Prop. 3 with the best order), and PLD tighter than RDP."""
    z, delta = 2.0, 1e-5
    rdp = PrivacyParameters(z, 100, 100, delta).epsilon_after(1)
    pld = PrivacyParameters(z, 100, 100, delta, accountant=AccountantKind.PLD).epsilon_after(1)
    assert rdp <= 1 / (2 * z * z) + math.sqrt(2 * math.log(1 / delta)) / z + 1e-6
    assert pld < rdp
    # The analytic Gaussian mechanism (Balle & Wang 2018) for σ = 2 at δ = 1e-5 gives ε ≈ 1.97.
    assert 1.8 < pld < 2.1


def test_calibration_hits_the_target() -> None:
    z = noise_multiplier_for(3.0, rounds=200, population=2000, clients_per_round=50, delta=1e-6)
    eps = PrivacyParameters(z, 2000, 50, 1e-6).epsilon_after(200)
    assert 2.9 < eps <= 3.0 + 1e-3
    # A larger population needs less noise for the same ε (privacy amplification by sampling).
    z_big = noise_multiplier_for(3.0, rounds=200, population=10**6, clients_per_round=50, delta=1e-6)
    assert z_big < z


def test_fixed_size_sampling_is_replace_one_and_rdp_only() -> None:
    fixed = PrivacyParameters(1.0, 1000, 10, 1e-5, sampling=Sampling.FIXED)
    poisson = PrivacyParameters(1.0, 1000, 10, 1e-5)
    assert fixed.epsilon_after(50) > poisson.epsilon_after(50)  # sensitivity 2S under replace-one
    with pytest.raises(AccountingError, match="Poisson"):
        PrivacyParameters(1.0, 1000, 10, 1e-5, sampling=Sampling.FIXED, accountant=AccountantKind.PLD)


def test_ledger_stops_before_the_budget_is_exceeded() -> None:
    p = PrivacyParameters(1.0, 1000, 100, 1e-5)
    budget = p.epsilon_after(5)
    ledger = PrivacyLedger(p, epsilon_budget=budget)
    runs = 0
    while ledger.next_round_fits():
        ledger.record_round()
        runs += 1
    assert runs == 5 and ledger.epsilon == pytest.approx(budget)


def test_dp_needs_uniform_weights_and_clipping() -> None:
    with pytest.raises(ValueError, match="uniform"):
        AggregationConfig(noise_multiplier=1.0)  # claimed weights: one user could weigh more
    with pytest.raises(ValueError, match="uniform"):
        AggregationConfig(weighting=Weighting.UNIFORM, norm_policy=NormPolicy.NONE, noise_multiplier=1.0)
    with pytest.raises(AccountingError):
        DpOptions()  # neither a noise multiplier nor a target


def test_gaussian_sum_is_the_clipped_sum_plus_noise_over_the_expected_count() -> None:
    shapes = [(2,), (3,)]
    updates = [np.array([[3.0, 4.0], [0.0, 0.0]]), np.array([[0.0, 0.0, 0.0], [0.0, 0.3, 0.4]])]
    # client 0 has norm 5 (clipped to 1), client 1 norm 0.5 (kept)
    quiet = build_aggregator(dataclasses_replace(DP_AGG, noise_multiplier=0.0), shapes, weight_cap=10,
                             max_clients=2, expected_clients=4, noise_rng=np.random.default_rng(0))
    quiet.fold(StackedDeltas(updates), np.array([7.0, 1.0]))  # claimed weights are ignored (uniform)
    mean = quiet.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [0.6 / 4, 0.8 / 4], rtol=1e-6)
    np.testing.assert_allclose(mean[1], [0.0, 0.3 / 4, 0.4 / 4], rtol=1e-6)
    assert quiet.report.stages[-1] == "gaussian_sum"

    # The noise: std z·S / K per coordinate, measured over many coordinates.
    big = GaussianSum([(200_000,)], clip=2.0, noise_multiplier=1.5, expected_clients=10,
                      rng=np.random.default_rng(1))
    noise = big.mean()
    assert noise is not None
    assert abs(float(noise[0].std()) - 1.5 * 2.0 / 10) < 0.003
    assert abs(float(noise[0].mean())) < 0.003


def test_noise_is_released_even_when_nobody_reported() -> None:
    agg = build_aggregator(DP_AGG, [(4,)], weight_cap=10, max_clients=1, expected_clients=3,
                           noise_rng=np.random.default_rng(2))
    mean = agg.mean()
    assert mean is not None and np.all(mean[0] != 0)


def dataclasses_replace(config: AggregationConfig, **changes: float) -> AggregationConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_budgeted_simulation_stops_and_reports_epsilon_per_round() -> None:
    from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
    from fedrecon.simulations.ratings import load_dataset
    from fedrecon.simulations.runner import SimulationSettings

    data = load_dataset("synthetic")
    options = DpOptions(noise_multiplier=1.0, delta=1e-5)
    population = len(data.train)
    budget = PrivacyParameters(1.0, population, 20, 1e-5, sampling=Sampling.FIXED).epsilon_after(6)
    spec = ExperimentSpec(num_factors=4, settings=SimulationSettings(rounds=50, clients_per_round=20,
                                                                     eval_every=3),
                          aggregation=AggregationConfig(weighting=Weighting.UNIFORM),
                          privacy=DpOptions(noise_multiplier=1.0, delta=1e-5, epsilon_budget=budget))
    result = run_experiment(spec, data)
    assert result.privacy is not None
    eps = result.privacy["epsilon_per_round"]
    assert len(eps) == 6 and result.privacy["rounds_run"] == 6
    assert all(a < b for a, b in itertools.pairwise(eps)) and eps[-1] <= budget + 1e-9
    assert "privacy budget" in result.privacy["stopped"]
    assert np.isfinite(result.test["rmse"])
    assert options.sampling == Sampling.FIXED  # the coordinator's kind of selection, by default


def test_a_budget_below_one_round_is_refused_before_training() -> None:
    from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
    from fedrecon.simulations.ratings import load_dataset
    from fedrecon.simulations.runner import SimulationSettings

    spec = ExperimentSpec(num_factors=4, settings=SimulationSettings(rounds=5, clients_per_round=20),
                          aggregation=AggregationConfig(weighting=Weighting.UNIFORM),
                          privacy=DpOptions(noise_multiplier=0.5, epsilon_budget=0.01))
    with pytest.raises(ValueError, match="one round already spends"):
        run_experiment(spec, load_dataset("synthetic"))


def test_simulate_with_a_target_epsilon_writes_epsilon_per_round(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from fedrecon.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--rounds", "6", "--clients-per-round", "40",
                                      "--factors", "4", "--eval-every", "3", "--dp-epsilon", "5",
                                      "--dp-delta", "1e-5",
                                      "--max-update-norm", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    privacy = metrics["privacy"]
    assert len(privacy["epsilon_per_round"]) == 6
    assert privacy["epsilon_per_round"][-1] == pytest.approx(5.0, abs=0.01)
    assert privacy["sampling"] == "fixed" and privacy["delta"] == 1e-5
    assert metrics["spec"]["aggregation"]["weighting"] == "uniform"  # set for DP when not given
    assert "ε = 5.000" in result.output.replace("\n", " ") or "ε = 4.99" in result.output


def test_simulate_refuses_dp_with_claimed_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from fedrecon.cli import app

    result = CliRunner().invoke(app, ["simulate", "--rounds", "2", "--dp-noise-multiplier", "1",
                                      "--server-weighting", "claimed", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "uniform" in result.output and "Traceback" not in result.output
