"""Bounded influence and finite models over real gRPC, on SQLite and PostgreSQL.

A hostile client with a valid assignment claims weight 1e9 and sends a huge update: with the default
aggregation (weight cap W = batch_size × post_recon_steps_max = 250, norm bound S) it moves the round's step
by exactly S · W / (W + Σ honest weights), and with uniform weighting by S / K. A client sending an update of
3e38 per value in two rounds never gets a non-finite model committed: the round that would overflow fails
with reason "non_finite" and the model stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.client.transport import CoordinatorChannel
from fedrecon.core.aggregation import DEFAULT_MAX_UPDATE_NORM, AggregationConfig
from fedrecon.protocol import Assignment
from fedrecon.server.app import start_server
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}  # one global tensor, 6 x 2
NAMES = ["item_embedding"]
S = DEFAULT_MAX_UPDATE_NORM
CAP = 5 * 50  # TaskSpec's batch_size × FedReconConfig's post_recon_steps_max


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    return str(request.getfixturevalue("postgres_url"))


@contextlib.contextmanager
def serving(url: str, task: TaskSpec) -> Iterator[tuple[CoordinatorChannel, SqlStore]]:
    with SqlStore(url) as store, start_server(Coordinator(store, task)) as server:
        channel = CoordinatorChannel(server.address)
        try:
            yield channel, store
        finally:
            channel.close()


def _report(channel: CoordinatorChannel, task: str, client: str, value: float, weight: float) -> None:
    assignment = channel.check_in(task, client)
    assert isinstance(assignment, Assignment), f"{client} got no assignment"
    channel.report(assignment, client, NAMES, [np.full((6, 2), value, np.float32)], weight,
                   {"post_recon_examples": min(weight, 1e6)})


def _version(store: SqlStore, task: str, version: int) -> np.ndarray:
    return globals_from_bytes(store.get_version(task, version).parameters, NAMES)[0]


@pytest.mark.parametrize(("weighting", "bound"), [("claimed", S * CAP / (CAP + 20)), ("uniform", S / 3)])
def test_one_client_claiming_1e9_moves_a_round_by_at_most_the_bound(store_url: str, weighting: str,
                                                                    bound: float) -> None:
    name = f"bounded-{weighting}"
    task = TaskSpec(name=name, model=MODEL, aggregation=AggregationConfig(weighting=weighting),  # type: ignore[arg-type]
                    rounds=RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=3))
    with serving(store_url, task) as (channel, store):
        g0 = _version(store, name, 0)
        _report(channel, name, "honest-1", 0.01, 10.0)
        _report(channel, name, "honest-2", -0.01, 10.0)  # the honest updates cancel: the attacker's step
        _report(channel, name, "hostile", 1e6, 1e9)
        (record,) = store.list_rounds(name)
        assert record.state == RoundState.COMMITTED
        step = _version(store, name, 1) - g0
    # The attacker's update (norm 1e6·√12) is clipped to S; its weight counts CAP (or 1 of 3).
    np.testing.assert_allclose(np.linalg.norm(step), bound, rtol=1e-5)
    np.testing.assert_allclose(step, bound / np.sqrt(12), rtol=1e-4)
    share = CAP / (CAP + 20) if weighting == "claimed" else 1 / 3
    assert record.metrics["max_single_client_share"] == pytest.approx(share)
    assert record.metrics["updates_clipped"] == 1
    assert record.metrics["weights_capped"] == (1 if weighting == "claimed" else 0)
    assert record.total_weight == (CAP + 20 if weighting == "claimed" else 3)  # the weight the mean used


@pytest.mark.parametrize("norm_policy", ["none", "clip"])
def test_3e38_twice_never_commits_a_non_finite_model(store_url: str, norm_policy: str) -> None:
    name = f"huge-{norm_policy}"
    task = TaskSpec(name=name, model=MODEL, aggregation=AggregationConfig(norm_policy=norm_policy),  # type: ignore[arg-type]
                    rounds=RoundSettings(clients_per_round=1, over_selection=1.0, min_reports=1))
    with serving(store_url, task) as (channel, store):
        _report(channel, name, "hostile-1", 3e38, 1.0)
        if norm_policy == "none":  # unbounded: the model is now about 3e38, and 3e38 more overflows float32
            with pytest.raises(grpc.RpcError) as caught:
                _report(channel, name, "hostile-2", 3e38, 1.0)
            assert caught.value.code() == grpc.StatusCode.ABORTED and "non_finite" in caught.value.details()
        else:  # clipped to S: both rounds commit a finite model
            _report(channel, name, "hostile-2", 3e38, 1.0)
        _report(channel, name, "honest", 0.01, 1.0)  # an honest round after it commits as usual
        rounds = store.list_rounds(name)
        versions = [_version(store, name, v) for v in range(store.latest_version(name).version + 1)]
    states = [r.state for r in sorted(rounds, key=lambda r: r.round_num)]
    if norm_policy == "none":
        assert states == [RoundState.COMMITTED, RoundState.FAILED, RoundState.COMMITTED]
        assert next(r for r in rounds if r.state == RoundState.FAILED).failure_reason.startswith("non_finite")
    else:
        assert states == [RoundState.COMMITTED] * 3
    assert len(versions) == 1 + states.count(RoundState.COMMITTED)
    assert all(np.isfinite(v).all() for v in versions)
