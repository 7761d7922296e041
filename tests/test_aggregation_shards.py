"""A round folded in shards and merged (``Aggregator.partial`` / ``merge``, what the Ray backend does)
gives the aggregate of folding all its clients at once, for every reducer and per-client stage."""

from __future__ import annotations

import numpy as np
import pytest

from fedrecon.core.aggregation import (
    AggregationConfig,
    Aggregator,
    NormPolicy,
    Reduction,
    StackedDeltas,
    Weighting,
    build_aggregator,
)

SHAPES = [(4, 3), (3,)]
CONFIGS = {
    "clipped weighted mean": AggregationConfig(max_update_norm=2.0),
    "reject above the bound": AggregationConfig(max_update_norm=2.0, norm_policy=NormPolicy.REJECT),
    "uniform weights": AggregationConfig(weighting=Weighting.UNIFORM, max_update_norm=2.0),
    "trimmed mean": AggregationConfig(reduction=Reduction.TRIMMED_MEAN, trim_fraction=0.2),
    "median": AggregationConfig(reduction=Reduction.MEDIAN),
    "DP with adaptive clipping": AggregationConfig(weighting=Weighting.UNIFORM, max_update_norm=2.0,
                                                   noise_multiplier=0.5, adaptive_clip_quantile=0.5,
                                                   clipped_count_stddev=1.0),
}


def _round(config: AggregationConfig, clients: int) -> Aggregator:
    # The same noise stream on both sides: the driver draws it once, when the mean is released.
    return build_aggregator(config, SHAPES, weight_cap=30.0, max_clients=clients, expected_clients=9,
                            noise_rng=np.random.default_rng(7))


def _updates() -> tuple[StackedDeltas, np.ndarray]:
    rng = np.random.default_rng(0)
    scales = np.array([0.1, 0.5, 1.0, 3.0, 0.2, 5.0, 0.7, 0.05, 2.5])  # some above the bound of 2
    tensors = [rng.normal(size=(9, *s)).astype(np.float32) * scales.reshape(-1, *[1] * len(s)) / 2
               for s in SHAPES]
    weights = np.array([5.0, 12.0, 0.0, 40.0, 7.0, 3.0, 25.0, 1.0, 9.0])  # one zero, one above the cap
    return StackedDeltas(tensors), weights


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shards_merged_in_order_give_the_whole_rounds_aggregate(name: str) -> None:
    config = CONFIGS[name]
    deltas, weights = _updates()
    whole = _round(config, 9)
    whole.fold(deltas, weights)

    driver = _round(config, 9)
    for part in (slice(0, 4), slice(4, 5), slice(5, 9)):
        shard = _round(config, part.stop - part.start)
        shard.fold(StackedDeltas([t[part] for t in deltas.tensors]), weights[part])
        driver.merge(shard.partial())

    assert driver.report.metrics() == pytest.approx(whole.report.metrics(), rel=1e-12)
    assert driver.report.updates_folded == whole.report.updates_folded
    expected, merged = whole.mean(), driver.mean()
    assert expected is not None and merged is not None
    for a, b in zip(merged, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert driver.next_clip_bound() == pytest.approx(whole.next_clip_bound())
    if name != "median":  # the stages did something this test can see
        assert whole.report.updates_clipped + whole.report.updates_refused + whole.report.weights_capped > 0


def test_a_shard_of_other_stages_is_refused() -> None:
    deltas, weights = _updates()
    shard = _round(AggregationConfig(max_update_norm=1.0), 9)
    shard.fold(deltas, weights)
    with pytest.raises(ValueError, match="cannot merge"):
        _round(AggregationConfig(max_update_norm=2.0), 9).merge(shard.partial())
