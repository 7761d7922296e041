"""Aggregation stages with numbers a person can check: weight cap, uniform weights, norm clip and reject,
trimmed mean, median, the buffer bound, non-finite refusal, the task settings (old fields included), and the
simulator and the coordinator giving the same aggregate for the same updates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.core.aggregation import (
    DEFAULT_MAX_UPDATE_NORM,
    DEFAULT_WEIGHT_CAP,
    AggregationConfig,
    Aggregator,
    NormPolicy,
    Reduction,
    StackedDeltas,
    build_aggregator,
)
from fedrecon.core.algorithm import FedRecon, NonFiniteUpdate
from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.client_work import client_update
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.core.model_spec import model_from_config
from fedrecon.protocol import Assignment
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

SHAPES = [(2,)]


def _agg(cap: float = 1e12, **config: object) -> Aggregator:
    return build_aggregator(AggregationConfig(**config), SHAPES, weight_cap=cap, max_clients=8)  # type: ignore[arg-type]


def _fold(agg: Aggregator, rows: list[list[float]], weights: list[float]) -> None:
    agg.fold(StackedDeltas([np.array(rows, np.float32)]), np.array(weights))


def test_a_claimed_weight_above_the_cap_is_clipped_to_it() -> None:
    agg = _agg(cap=3.0, norm_policy="none")
    _fold(agg, [[1.0, 0.0], [0.0, 1.0]], [1.0, 1e9])
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [1 / 4, 3 / 4])  # (1·[1,0] + 3·[0,1]) / (1 + 3)
    r = agg.report
    assert (r.weights_capped, r.total_weight, r.max_single_client_share) == (1, 4.0, 0.75)


def test_uniform_weighting_makes_each_report_one_kth() -> None:
    agg = _agg(weighting="uniform", norm_policy="none")
    _fold(agg, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [1.0, 1e9, 0.0])  # weight 0 (non-finite guard): out
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [0.5, 0.5])
    assert agg.report.max_single_client_share == 0.5
    assert agg.num_updates == 3 and agg.total_weight == 2.0  # the weight-0 report is counted, inert


def test_the_default_cap_comes_from_the_tasks_own_bound_on_examples() -> None:
    config = AggregationConfig()
    assert config.weight_cap(FedReconConfig(), batch_size=5) == 250.0  # 5 × post_recon_steps_max 50
    assert config.weight_cap(FedReconConfig(post_recon_steps_max=None), batch_size=5) == DEFAULT_WEIGHT_CAP
    assert AggregationConfig(max_client_weight=7.0).weight_cap(FedReconConfig(), batch_size=5) == 7.0


def test_an_update_above_the_norm_bound_is_scaled_down_to_it() -> None:
    agg = _agg(max_update_norm=1.0)
    _fold(agg, [[3.0, 4.0], [0.0, 0.5]], [1.0, 1.0])  # norm 5 -> [0.6, 0.8]; norm 0.5 untouched
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [0.3, 0.65], rtol=1e-6)
    assert agg.report.updates_clipped == 1 and agg.report.max_norm == pytest.approx(5.0)


def test_reject_policy_refuses_the_update_and_folds_nothing_of_it() -> None:
    agg = _agg(max_update_norm=1.0, norm_policy="reject")
    result = agg.fold(StackedDeltas([np.array([[3.0, 4.0], [0.0, 0.5]], np.float32)]), np.array([1.0, 1.0]))
    assert list(result.refused) == [0] and result.refused[0][0] == "norm_too_large"
    assert "5" in result.refused[0][1]
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [0.0, 0.5])
    assert agg.num_updates == 1 and agg.report.updates_refused == 1


def test_a_huge_finite_update_is_clipped_without_overflow() -> None:
    agg = _agg(max_update_norm=2.0)
    agg.fold_one([np.array([3e38, 3e38], np.float32)], 1.0)  # ‖·‖² = 1.8e77: only float64 holds it
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [math.sqrt(2.0), math.sqrt(2.0)], rtol=1e-6)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    agg = _agg(reduction="trimmed_mean", trim_fraction=0.2, norm_policy="none")
    # Coordinate 0 has values 1, 2, 3, 4, 100; coordinate 1 has -100, 0, 0, 0, 5. Cut ⌊0.2·5⌋ = 1 at each end.
    _fold(agg, [[1, -100], [2, 0], [3, 0], [4, 0], [100, 5]], [1, 1, 1, 1, 1e9])
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [3.0, 0.0])
    assert agg.report.max_single_client_share == pytest.approx(0.2)  # each report counts once


def test_median_of_each_coordinate() -> None:
    agg = _agg(reduction="median", norm_policy="none")
    _fold(agg, [[1, 7], [2, 8]], [1, 1])
    _fold(agg, [[3, 9], [100, -50]], [5, 5])  # folded in two calls: the buffer keeps all four
    mean = agg.mean()
    assert mean is not None
    np.testing.assert_allclose(mean[0], [2.5, 7.5])


def test_buffering_reducers_are_bounded() -> None:
    config = AggregationConfig(reduction="median", max_buffer_bytes=4 * 2 * 8)  # 8 updates of 2 float32s
    build_aggregator(config, SHAPES, weight_cap=1.0, max_clients=8)
    with pytest.raises(ValueError, match="72 bytes"):
        build_aggregator(config, SHAPES, weight_cap=1.0, max_clients=9)
    agg = build_aggregator(config, SHAPES, weight_cap=1.0, max_clients=2)
    _fold(agg, [[1, 1], [2, 2]], [1, 1])
    with pytest.raises(ValueError, match="more than 2 updates"):
        _fold(agg, [[3, 3]], [1])


def _tiny_algorithm(**aggregation: object) -> FedRecon:
    model = model_from_config({"kind": "matrix_factorization", "num_items": 2, "num_factors": 1})
    return FedRecon(model, FedReconConfig(), aggregation=AggregationConfig(**aggregation))  # type: ignore[arg-type]


def test_a_round_that_would_make_the_model_non_finite_is_refused() -> None:
    algorithm = _tiny_algorithm(norm_policy="none")
    state = algorithm.initial_state(0)
    huge = [np.full((2, 1), 3e38, np.float32)]
    for _ in range(2):
        aggregate = algorithm.new_aggregate(max_clients=1, batch_size=5)
        aggregate.fold_one(huge, 1.0)
        try:
            state = algorithm.server_update(state, aggregate)
        except NonFiniteUpdate as err:
            assert "not be finite" in str(err)
            break
    else:
        pytest.fail("3e38 + 3e38 overflowed float32 but was applied")
    assert state.round_num == 1 and np.isfinite(state.globals[0]).all()  # the first round's model stays


def test_the_default_bound_keeps_the_same_attack_finite() -> None:
    algorithm = _tiny_algorithm()
    state = algorithm.initial_state(0)
    for _ in range(2):
        aggregate = algorithm.new_aggregate(max_clients=1, batch_size=5)
        aggregate.fold_one([np.full((2, 1), 3e38, np.float32)], 1.0)
        new = algorithm.server_update(state, aggregate)
        np.testing.assert_allclose(np.linalg.norm(new.globals[0] - state.globals[0]), DEFAULT_MAX_UPDATE_NORM,
                                   rtol=1e-5)
        state = new


# ----- settings ----------------------------------------------------------------------------------------
MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}


def test_task_settings_round_trip_and_old_fields_still_load() -> None:
    spec = TaskSpec.from_dict({"name": "t", "model": MODEL, "aggregation": {
        "reduction": "trimmed_mean", "trim_fraction": 0.25, "max_client_weight": 40, "weighting": "uniform"}})
    assert spec.aggregation.reduction == Reduction.TRIMMED_MEAN and spec.aggregation.max_client_weight == 40
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec

    # What every older release stored: both fields, the bound null -> the default bound, clipped.
    stored = {"name": "t", "model": MODEL, "rounds": {"clients_per_round": 10, "max_update_norm": None,
                                                      "norm_policy": "reject"}}
    old = TaskSpec.from_dict(stored)
    assert old.aggregation == AggregationConfig() and old.rounds.clients_per_round == 10
    assert TaskSpec.from_dict(old.to_dict()) == old
    # An explicit old bound keeps its policy (absent: the old default, "reject").
    explicit = TaskSpec.from_dict({"name": "t", "model": MODEL, "rounds": {"max_update_norm": 2.0}})
    assert explicit.aggregation.max_update_norm == 2.0
    assert explicit.aggregation.norm_policy == NormPolicy.REJECT
    clip = TaskSpec.from_dict({"name": "t", "model": MODEL,
                               "rounds": {"max_update_norm": 2.0, "norm_policy": "clip"}})
    assert clip.aggregation.norm_policy == NormPolicy.CLIP and TaskSpec.from_dict(clip.to_dict()) == clip
    # An explicit null in the new table is the default too.
    assert TaskSpec.from_dict({"name": "t", "model": MODEL, "aggregation": {"max_update_norm": None}}
                              ).aggregation == AggregationConfig()


@pytest.mark.parametrize(("aggregation", "rounds", "message"), [
    ({"reduction": "mode"}, {}, "mode"),
    ({"trim_fraction": 0.5}, {}, "trim_fraction"),
    ({"max_update_norm": -1}, {}, "max_update_norm"),
    ({"max_client_weight": 0}, {}, "max_client_weight"),
    ({"clip": True}, {}, "unknown aggregation fields"),
    ({"max_update_norm": 3.0}, {"max_update_norm": 2.0}, "both in"),
])
def test_bad_aggregation_settings_are_refused(aggregation: dict, rounds: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSpec.from_dict({"name": "t", "model": MODEL, "aggregation": aggregation, "rounds": rounds})


# ----- one implementation: the simulator and the coordinator agree --------------------------------------
def _clients(num_items: int, count: int) -> list[ClientExamples]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(count):
        n = int(rng.integers(12, 30))
        out.append(ClientExamples(x=rng.integers(0, num_items, n).astype(np.int32),
                                  y=rng.integers(1, 6, n).astype(np.float32)))
    return out


def test_simulator_and_coordinator_commit_the_same_clipped_mean(tmp_path: Path) -> None:
    model_config = {"kind": "matrix_factorization", "num_items": 8, "num_factors": 3}
    training = FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0))
    clients = _clients(8, 4)
    model = model_from_config(model_config)
    # A bound below most honest norms here, so clipping really acts on both sides.
    algorithm = FedRecon(model, training, aggregation=AggregationConfig(max_update_norm=0.5))
    state = algorithm.initial_state(3)
    seeds = [np.random.default_rng(40 + c) for c in range(len(clients))]
    packed = pack_clients(model, clients, training, batch_size=5, local_rngs=seeds)
    result = algorithm.client_step.train_clients(state.globals, packed)
    aggregate = algorithm.new_aggregate(max_clients=len(clients), batch_size=5)
    aggregate.fold(result.deltas, result.weights)
    assert aggregate.report.updates_clipped >= 2
    simulated = algorithm.server_update(state, aggregate).globals[0]

    task = TaskSpec(name="same", model=model_config, training=training, seed=3,
                    aggregation=AggregationConfig(max_update_norm=0.5),
                    rounds=RoundSettings(clients_per_round=len(clients), over_selection=1.0,
                                         min_reports=len(clients)))
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        coordinator = Coordinator(store, task, clock=ManualClock())
        for c, examples in enumerate(clients):
            a = coordinator.check_in("same", f"c{c}", 1)
            assert isinstance(a, Assignment)
            update = client_update(algorithm.client_step, state.globals, examples, batch_size=5,
                                   rng=np.random.default_rng(40 + c))  # what a device runs (C = 1)
            coordinator.report("same", f"c{c}", a.round_id, a.token, update.weight, update.metrics,
                               update.delta)
        assert coordinator.version == 1
        (record,) = store.list_rounds("same")
        assert record.metrics["updates_clipped"] == aggregate.report.updates_clipped
        committed = globals_from_bytes(store.get_version("same", 1).parameters, ["item_embedding"])[0]
    np.testing.assert_allclose(committed, simulated, atol=1e-6)


def test_a_coordinator_round_with_a_non_finite_result_fails_and_the_model_stays(tmp_path: Path) -> None:
    task = TaskSpec(name="inf", model=MODEL, aggregation=AggregationConfig(norm_policy="none"),
                    rounds=RoundSettings(clients_per_round=1, over_selection=1.0, min_reports=1))
    huge = [np.full((6, 2), 3e38, np.float32)]
    with SqlStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        c = Coordinator(store, task, clock=ManualClock())
        first = c.check_in("inf", "a", 1)
        assert isinstance(first, Assignment)
        assert c.report("inf", "a", first.round_id, first.token, 1.0, {}, huge).accepted  # model ≈ 3e38
        second = c.check_in("inf", "b", 1)
        assert isinstance(second, Assignment)
        with pytest.raises(Refusal) as caught:  # 3e38 + 3e38 overflows float32
            c.report("inf", "b", second.round_id, second.token, 1.0, {}, huge)
        assert (caught.value.status, caught.value.reason) == (Status.ABORTED, "commit_failed")
        assert "non_finite" in caught.value.message
        rounds = store.list_rounds("inf")
        assert [r.state for r in rounds] == [RoundState.COMMITTED, RoundState.FAILED]
        assert rounds[1].failure_reason.startswith("non_finite")
        assert c.version == 1 and np.isfinite(
            globals_from_bytes(store.get_version("inf", 1).parameters, ["item_embedding"])[0]).all()


def test_simulate_stops_with_one_clear_line_on_a_non_finite_round(tmp_path: Path) -> None:
    from fedrecon.cli import app

    # A server learning rate of 1e39 is infinite in float32: the first round's model would be non-finite.
    result = CliRunner().invoke(app, ["simulate", "--rounds", "3", "--clients-per-round", "5",
                                      "--server-lr", "1e39", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "not be finite" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("option", "message"), [(["--max-update-norm", "-1"], "max_update_norm"),
                                                 (["--max-client-weight", "0"], "max_client_weight")])
def test_simulate_refuses_bad_aggregation_options_in_one_line(option: list[str], message: str,
                                                              tmp_path: Path) -> None:
    from fedrecon.cli import app

    result = CliRunner().invoke(app, ["simulate", *option, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
