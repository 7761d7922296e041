"""Adaptive clipping (Andrew et al. 2021): the norm bound follows a target quantile of the update norms, in
the simulator and in the coordinator (which keeps the bound with each model version, across a restart).

Numbers by hand: with target quantile 1/2 and learning rate 0.2, a round in which half the updates lie
within the bound leaves it unchanged, and one with a quarter within multiplies it by exp(0.2 x 0.25).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedrecon.core.aggregation import AggregationConfig, StackedDeltas, Weighting, build_aggregator
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.protocol import Assignment
from fedrecon.server.checkpoints import clip_bound_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

ADAPTIVE = AggregationConfig(adaptive_clip_quantile=0.5, adaptive_clip_learning_rate=0.2)


def _round(config: AggregationConfig, bound: float, norms: list[float], **kwargs: object) -> float | None:
    """One round of updates [n, 0] folded together; the bound the next round gets."""
    aggregate = build_aggregator(config, [(2,)], weight_cap=1e9, max_clients=len(norms), clip_bound=bound,
                                 **kwargs)  # type: ignore[arg-type]
    deltas = StackedDeltas([np.array([[n, 0.0] for n in norms], np.float32)])
    aggregate.fold(deltas, np.ones(len(norms)))
    # An adaptive bound is the one given; a fixed one stays max_update_norm whatever is given.
    assert aggregate.report.clip_bound == (bound if config.adaptive_clip_quantile else config.max_update_norm)
    aggregate.mean()
    return aggregate.next_clip_bound()


def test_the_geometric_update_by_hand() -> None:
    assert _round(ADAPTIVE, 2.5, [1, 2, 3, 4]) == pytest.approx(2.5)  # 2 of 4 within: at the quantile
    assert _round(ADAPTIVE, 1.5, [1, 2, 3, 4]) == pytest.approx(1.5 * math.exp(0.2 * 0.25))  # 1 of 4
    assert _round(ADAPTIVE, 10.0, [1, 2, 3, 4]) == pytest.approx(10.0 * math.exp(-0.2 * 0.5))  # all 4
    assert _round(AggregationConfig(), 2.5, [1, 2, 3, 4]) is None  # a fixed bound does not move


def test_the_bound_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(3)
    bound: float = 20.0
    for _ in range(80):
        norms = rng.lognormal(mean=math.log(3.0), sigma=0.5, size=100).tolist()  # median 3.0
        next_bound = _round(ADAPTIVE, bound, norms)
        assert next_bound is not None
        bound = next_bound
    assert bound == pytest.approx(3.0, rel=0.1)
    high = AggregationConfig(adaptive_clip_quantile=0.9)
    bound = 3.0
    for _ in range(80):
        norms = rng.lognormal(mean=math.log(3.0), sigma=0.5, size=100).tolist()
        next_bound = _round(high, bound, norms)
        assert next_bound is not None
        bound = next_bound
    assert bound == pytest.approx(3.0 * math.exp(0.5 * 1.2816), rel=0.15)  # the 90th percentile


def test_under_dp_the_two_releases_share_the_noise_multiplier() -> None:
    config = AggregationConfig(weighting=Weighting.UNIFORM, noise_multiplier=1.0, adaptive_clip_quantile=0.5,
                               clipped_count_stddev=5.0)
    z_sum, sigma_b = config.noise_split(expected_clients=100)
    assert sigma_b == 5.0 and z_sum == pytest.approx(1 / math.sqrt(1 - 1 / 100))  # (1 - (2*5)^-2)^-1/2
    assert AggregationConfig(weighting=Weighting.UNIFORM, noise_multiplier=1.0,
                             adaptive_clip_quantile=0.5).noise_split(100) == (pytest.approx(z_sum), 5.0)
    with pytest.raises(ValueError, match="needs 2 x clipped_count_stddev > noise_multiplier"):
        AggregationConfig(weighting=Weighting.UNIFORM, noise_multiplier=3.0,
                          adaptive_clip_quantile=0.5).noise_split(20)  # 2 x 20/20 = 2 < 3
    with pytest.raises(ValueError, match="needs norm_policy 'clip'"):
        AggregationConfig(adaptive_clip_quantile=0.5, norm_policy="reject")
    # The count's noise moves the bound: same norms, different draws, different bounds.
    draws = {_round(config, 2.5, [1, 2, 3, 4], expected_clients=4, noise_rng=np.random.default_rng(s))
             for s in range(3)}
    assert len(draws) == 3


def test_the_coordinator_keeps_the_bound_with_each_version(tmp_path: Path) -> None:
    task = TaskSpec(name="adaptive", model={"kind": "matrix_factorization", "num_items": 4, "num_factors": 1},
                    rounds=RoundSettings(clients_per_round=4, over_selection=1.0, min_reports=4),
                    training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0)),
                    aggregation=AggregationConfig(max_update_norm=1.5, adaptive_clip_quantile=0.5,
                                                  adaptive_clip_learning_rate=0.2))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with SqlStore(url) as store:
        c = Coordinator(store, task, clock=ManualClock(), replica_id="node-1")
        for i, norm in enumerate([1.0, 2.0, 3.0, 4.0]):
            a = c.check_in("adaptive", f"u{i}", 1)
            assert isinstance(a, Assignment)
            c.report("adaptive", f"u{i}", a.round_id, a.token, 1.0, {}, [np.array([[norm], [0], [0], [0]],
                                                                                 np.float32)])
        assert c.version == 1
        expected = 1.5 * math.exp(0.2 * 0.25)
        stored = clip_bound_from_bytes(store.get_version("adaptive", 1).optimizer_state)
        assert stored == pytest.approx(expected)
        (record,) = store.list_rounds("adaptive")
        assert record.metrics["clip_bound"] == 1.5 and record.metrics["updates_clipped"] == 3
    with SqlStore(url) as store:
        again = Coordinator(store, task, clock=ManualClock(), replica_id="node-1")  # restarted
        a = again.check_in("adaptive", "v", 1)
        assert isinstance(a, Assignment)
        r = again._round
        assert r is not None and r.aggregate.report.clip_bound == pytest.approx(expected)


def test_a_simulation_adapts_its_bound() -> None:
    from fedrecon.simulations.experiment import ExperimentSpec, run_experiment
    from fedrecon.simulations.ratings import load_dataset
    from fedrecon.simulations.runner import SimulationSettings

    spec = ExperimentSpec(num_factors=4, settings=SimulationSettings(rounds=12, clients_per_round=20,
                                                                     eval_every=6),
                          aggregation=AggregationConfig(max_update_norm=50.0, adaptive_clip_quantile=0.5))
    bounds: list[float] = []
    result = run_experiment(spec, load_dataset("synthetic"),
                            on_round=lambda record, _: bounds.append(record.aggregation["clip_bound"]))
    assert bounds[0] == 50.0 and bounds[-1] < bounds[0] * math.exp(-0.2 * 0.5 * 10)  # all within: shrinks
    assert np.isfinite(result.test["rmse"])
