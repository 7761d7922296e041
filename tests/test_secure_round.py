"""Secure aggregation as a task setting, without a network: the refusals of incompatible settings, the task
file, the client-side encoding (clip, weight as a masked coordinate) with hand-checkable numbers, the
simulator's in-process secure sum against the plain stages, and the stages a round records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrecon.core.aggregation import AggregationConfig, StackedDeltas, build_aggregator
from fedrecon.core.secagg import Quantiser
from fedrecon.core.secagg.local import DropoutPlan, secure_round_sum
from fedrecon.core.secagg.updates import SecureEncoding
from fedrecon.server.task import TaskSpec


@pytest.mark.parametrize(("settings", "named"), [
    ({"upload_codec": "q8"}, "upload_codec 'q8'"),
    ({"upload_codec": "rowsparse"}, "upload_codec 'rowsparse'"),
    ({"reduction": "trimmed_mean"}, "reduction 'trimmed_mean'"),
    ({"reduction": "median"}, "reduction 'median'"),
    ({"norm_policy": "reject"}, "norm_policy 'reject'"),
    ({"norm_policy": "none"}, "norm_policy 'none'"),
    ({"adaptive_clip_quantile": 0.5}, "adaptive_clip_quantile"),
    ({"secure_neighbours": 3}, "even"),
    ({"secure_neighbours": 4, "secure_threshold": 5}, "cannot exceed"),
])
def test_settings_that_need_individual_updates_are_refused_with_the_reason(settings: dict[str, object],
                                                                          named: str) -> None:
    with pytest.raises(ValueError, match=named) as caught:
        AggregationConfig(secure_aggregation=True, **settings)  # type: ignore[arg-type]
    assert "secure" in str(caught.value)


def test_secure_settings_without_secure_aggregation_are_refused() -> None:
    with pytest.raises(ValueError, match="need secure_aggregation = true"):
        AggregationConfig(secure_threshold=3)


def test_a_task_file_turns_secure_aggregation_on(tmp_path: Path) -> None:
    path = tmp_path / "task.toml"
    path.write_text('name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                    '[aggregation]\nsecure_aggregation = true\nsecure_neighbours = 8\nsecure_threshold = 5\n'
                    'weighting = "uniform"\nnoise_multiplier = 1.0\n')
    a = TaskSpec.load(path).aggregation
    assert (a.secure_aggregation, a.secure_neighbours, a.secure_threshold) == (True, 8, 5)
    path.write_text('name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                    '[aggregation]\nsecure_aggregation = true\nupload_codec = "q16"\n')
    with pytest.raises(ValueError, match="upload_codec 'q16' cannot be used with secure_aggregation"):
        TaskSpec.load(path)


def test_the_client_encoding_clips_weights_and_appends_the_weight() -> None:
    encoding = SecureEncoding(max_update_norm=5.0, weight_scale=100.0, uniform_weights=False)
    # norm 10 -> clipped by 1/2; weight 400 -> capped at 100 (factor 1); weight 50 -> factor 1/2.
    assert encoding.encode([np.array([6.0, 8.0])], 400.0).tolist() == [3.0, 4.0, 1.0]
    assert encoding.encode([np.array([0.3, 0.4])], 50.0).tolist() == [0.15, 0.2, 0.5]
    assert encoding.encode([np.array([np.nan, 1.0])], 50.0).tolist() == [0.0, 0.0, 0.0]  # non-finite: nothing
    sums, weight = encoding.decode_sum(np.array([3.15, 4.2, 1.5]), [(2,)])
    np.testing.assert_allclose(sums[0], [315.0, 420.0])
    assert weight == pytest.approx(150.0)  # Σ w: the mean is (100·[3, 4] + 50·[0.3, 0.4]) / 150
    uniform = SecureEncoding(max_update_norm=0.5, weight_scale=1.0, uniform_weights=True)
    assert uniform.clip == 1.0  # the weight coordinate (1) must fit in the quantiser's range
    assert uniform.encode([np.array([0.3, 0.4])], 7.0).tolist() == [0.3, 0.4, 1.0]
    assert uniform.encode([np.array([0.3, 0.4])], 0.0).tolist() == [0.0, 0.0, 0.0]


def test_the_simulators_secure_sum_equals_the_plain_stages_within_quantisation() -> None:
    config = AggregationConfig(secure_aggregation=True, max_update_norm=1.0)
    shapes = [(4, 3), (5,)]
    rng = np.random.default_rng(0)
    deltas = [[rng.normal(0, 0.3, s).astype(np.float32) for s in shapes] for _ in range(6)]
    weights = [3.0, 9.0, 1.0, 500.0, 4.0, 7.0]  # one above the cap of 250
    plain = build_aggregator(AggregationConfig(max_update_norm=1.0), shapes, weight_cap=250.0, max_clients=6)
    plain.fold(StackedDeltas([np.stack([d[i] for d in deltas]) for i in range(2)]), np.array(weights))
    secure = build_aggregator(config, shapes, weight_cap=250.0, max_clients=6)
    sums, total_weight, result = secure_round_sum(config.secure_encoding(250.0), deltas, weights, shapes,
                                                  round_id=b"test", rng=np.random.default_rng(1))
    secure.fold_secure_sum(sums, total_weight, result.count)
    assert secure.report.stages == ("client_weight_cap", "client_norm_clip", "secure_sum", "weighted_mean")
    assert result.count == 6 and secure.total_weight == pytest.approx(plain.total_weight, abs=1e-3)
    levels = Quantiser(clip=1.0, max_clients=6).levels
    bound = 6 * (2.0 / levels) * 250.0 / plain.total_weight * 2  # rounding of the sum and of the weight
    for s, p in zip(secure.mean() or [], plain.mean() or [], strict=True):
        np.testing.assert_allclose(s, p, atol=bound + 1e-7, rtol=0)


def test_a_simulated_dropout_leaves_the_dropped_client_out_of_the_sum() -> None:
    encoding = SecureEncoding(max_update_norm=10.0, weight_scale=1.0, uniform_weights=True)
    deltas = [[np.full(3, float(c))] for c in range(1, 6)]
    sums, weight, result = secure_round_sum(encoding, deltas, [1.0] * 5, [(3,)], round_id=b"drop",
                                            rng=np.random.default_rng(2),
                                            dropouts=DropoutPlan(before_masked_input=[2]))
    assert result.count == 4 and weight == pytest.approx(4.0, abs=1e-6)
    np.testing.assert_allclose(sums[0], np.full(3, 1 + 3 + 4 + 5), atol=1e-5)  # client 2 is not in it


def test_central_dp_with_secure_aggregation_adds_the_noise_to_the_unmasked_sum() -> None:
    config = AggregationConfig(secure_aggregation=True, weighting="uniform",  # type: ignore[arg-type]
                               noise_multiplier=1.0)
    aggregate = build_aggregator(config, [(2,)], weight_cap=1.0, max_clients=4, expected_clients=4,
                                 noise_rng=np.random.default_rng(3))
    assert aggregate.report.stages == ("client_uniform_weights", "client_norm_clip", "secure_sum",
                                       "gaussian_sum")
    aggregate.fold_secure_sum([np.array([4.0, 8.0])], 4.0, 4)
    noise = np.random.default_rng(3).normal(0.0, 1.0 * 20.0, size=2)  # z · S on the sum, then / K
    np.testing.assert_allclose(aggregate.mean()[0], (np.array([4.0, 8.0]) + noise) / 4, rtol=1e-6)  # type: ignore[index]


def test_a_coordinator_refuses_at_start_settings_no_round_could_run_with(tmp_path: Path) -> None:
    from fedrecon.server.coordinator import Coordinator
    from fedrecon.server.store import SqlStore, UnknownTask
    from fedrecon.server.task import RoundSettings

    task = TaskSpec(name="too-high", model={"kind": "matrix_factorization", "num_items": 3},
                    aggregation=AggregationConfig(secure_aggregation=True, secure_threshold=6),
                    rounds=RoundSettings(clients_per_round=5, over_selection=1.0))
    with SqlStore(f"sqlite:///{tmp_path / 'c.db'}") as store:
        with pytest.raises(ValueError, match=r"threshold must be in 1\.\.4"):
            Coordinator(store, task)
        with pytest.raises(UnknownTask):  # refused before anything was written
            store.get_task("too-high")


def test_a_masked_update_larger_than_a_message_is_refused_at_start(tmp_path: Path) -> None:
    """A masked update travels as one gRPC message: a model too large for it is refused when the server
    starts, with the figures, by the API and by ``fedrecon serve`` (one line, exit 2); a model that fits
    starts."""
    import subprocess
    import sys

    from fedrecon.server.app import start_server
    from fedrecon.server.coordinator import Coordinator
    from fedrecon.server.store import SqlStore

    def task(num_items: int) -> TaskSpec:
        return TaskSpec(name="big", model={"kind": "matrix_factorization", "num_items": num_items,
                                           "num_factors": 50},
                        aggregation=AggregationConfig(secure_aggregation=True))

    # 21,000 × 50 = 1,050,000 values: 4.0 MiB masked, over 4 MiB with the weight and framing.
    with SqlStore(f"sqlite:///{tmp_path / 'c.db'}") as store, \
            pytest.raises(ValueError, match=r"masked update as one message of 4\.01 MiB \(1,050,001 values\)"
                                            r".*under 1,048,319 trainable global values"):
        start_server(Coordinator(store, task(21_000)))
    with SqlStore(f"sqlite:///{tmp_path / 'd.db'}") as store, \
            start_server(Coordinator(store, task(20_000))) as server:  # 1,000,001 values: 3.8 MiB, fits
        assert server.port > 0
    (tmp_path / "big.toml").write_text('name = "big"\n[model]\nkind = "matrix_factorization"\n'
                                       'num_items = 21000\nnum_factors = 50\n'
                                       '[aggregation]\nsecure_aggregation = true\n')
    ran = subprocess.run([sys.executable, "-m", "fedrecon.cli", "serve", "--task", str(tmp_path / "big.toml"),
                          "--store", f"sqlite:///{tmp_path / 'e.db'}", "--port", "0"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr
    (line,) = [x for x in ran.stderr.splitlines() if "masked update" in x]
    assert "secure aggregation sends each client's masked update as one message" in line
