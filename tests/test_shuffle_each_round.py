"""Shuffling a client's examples every round (``FedReconConfig.shuffle_each_round``) as a training setting:
it travels with the task to devices, a device draws a fresh order every round, the simulator one seeded by
(seed, round, user), evaluation never shuffles, and a task file must say it as a boolean.

Why it matters: with step caps below a client's batches, an unshuffled client trains on the same first
batches every round and never on the rest of its data (the next-word task's devices hold up to 16 batches
against 8-step phases).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedrecon.core.client_work as client_work
from fedrecon.client import FederatedClient
from fedrecon.core.batching import ClientExamples, PackedClients, pack_clients
from fedrecon.core.config import FedReconConfig
from fedrecon.core.matrix_factorization import MatrixFactorization
from fedrecon.server.app import start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

NUM_ITEMS = 8
#: 40 examples in batches of 5 (8 batches), phases capped at one step: order decides what is trained on.
CAPPED = {"recon_epochs": 1, "recon_steps_max": 1, "post_recon_epochs": 1, "post_recon_steps_max": 1}


def _client() -> ClientExamples:
    return ClientExamples(x=(np.arange(40, dtype=np.int32) % NUM_ITEMS), y=np.arange(40, dtype=np.float32))


def _task(shuffle: bool) -> TaskSpec:
    return TaskSpec(name="order", model={"kind": "matrix_factorization", "num_items": NUM_ITEMS,
                                         "num_factors": 2},
                    training=FedReconConfig(shuffle_each_round=shuffle, **CAPPED),  # type: ignore[arg-type]
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, over_selection=1.0,
                                         selection_timeout_s=60.0, reporting_timeout_s=60.0),
                    batch_size=5)


def test_the_setting_round_trips_and_an_old_config_without_it_keeps_it_off() -> None:
    config = FedReconConfig(shuffle_each_round=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["shuffle_each_round"] is True
    assert FedReconConfig.from_dict(data) == config
    del data["shuffle_each_round"]  # a configuration stored or sent before the setting existed
    assert FedReconConfig.from_dict(data).shuffle_each_round is False
    spec = _task(True)
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_a_task_file_must_give_it_as_true_or_false(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "task.toml"
    shown = json.dumps(value) if value is not None else '"null"'
    path.write_text(f'name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                    f"[training]\nshuffle_each_round = {shown}\n")
    with pytest.raises(ValueError, match="shuffle_each_round must be true or false"):
        TaskSpec.load(path)
    path.write_text('name = "t"\n[model]\nkind = "matrix_factorization"\nnum_items = 3\n'
                    "[training]\nshuffle_each_round = true\n")
    assert TaskSpec.load(path).training.shuffle_each_round is True


def test_a_training_pack_needs_order_generators_and_an_evaluation_pack_never_shuffles() -> None:
    model = MatrixFactorization(NUM_ITEMS, 2)
    shuffling = FedReconConfig(shuffle_each_round=True, **CAPPED)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order_rngs"):
        pack_clients(model, [_client()], shuffling, batch_size=5, local_rngs=[np.random.default_rng(0)])
    fixed = pack_clients(model, [_client()], shuffling.replace(shuffle_each_round=False), batch_size=5,
                         local_rngs=[np.random.default_rng(0)], evaluation=True)
    held_out = pack_clients(model, [_client()], shuffling, batch_size=5,
                            local_rngs=[np.random.default_rng(0)], order_rngs=[np.random.default_rng(1)],
                            evaluation=True)
    for a, b in ((fixed.reconstruction, held_out.reconstruction),
                 (fixed.post_reconstruction, held_out.post_reconstruction)):
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.x, b.x)


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[PackedClients]:
    """Every pack the device's client step makes (the real ``pack_clients``, recorded)."""
    made: list[PackedClients] = []

    def recording(*args: Any, **kwargs: Any) -> PackedClients:
        packed = pack_clients(*args, **kwargs)
        made.append(packed)
        return packed

    monkeypatch.setattr(client_work, "pack_clients", recording)
    return made


def _device_runs(tmp_path: Path, shuffle: bool, runs: int) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    """A device of a served task trains ``runs`` times on its assignment (same globals, same fresh locals,
    the order left to the client library): the training configuration the assignment carried, and each
    run's delta."""
    with SqlStore(f"sqlite:///{tmp_path / f'{shuffle}.db'}") as store, \
            start_server(Coordinator(store, _task(shuffle))) as server, \
            FederatedClient(server.address, "order", "device-1", _client()) as device:
        assignment = device.check_in(max_wait_s=30)
        deltas = [device.train(assignment, np.random.default_rng(0))[1].delta for _ in range(runs)]
        return json.loads(assignment.training_config_json), deltas


def test_a_device_draws_a_fresh_order_every_round_when_the_task_says_so(tmp_path: Path,
                                                                       packs: list[PackedClients]) -> None:
    sent, deltas = _device_runs(tmp_path, True, 3)
    assert sent["shuffle_each_round"] is True
    trained = [sorted(p.post_reconstruction.y[0, 0].tolist()) for p in packs]
    rebuilt = [sorted(p.reconstruction.y[0, 0].tolist()) for p in packs]
    assert len(trained) == 3
    assert len({tuple(t) for t in trained}) > 1, trained  # not the same first batch every time
    assert len({tuple(r) for r in rebuilt}) > 1, rebuilt
    assert any(max(t) >= 10.0 for t in trained)  # examples past the first two batches get trained on
    assert max(float(np.abs(a - b).max()) for a, b in zip(deltas[0], deltas[1], strict=True)) > 0


def test_without_the_setting_a_device_trains_on_the_same_batches_every_round(
        tmp_path: Path, packs: list[PackedClients]) -> None:
    sent, deltas = _device_runs(tmp_path, False, 2)
    assert sent["shuffle_each_round"] is False
    assert [p.post_reconstruction.y[0, 0].tolist() for p in packs] == [[5.0, 6.0, 7.0, 8.0, 9.0]] * 2
    assert [p.reconstruction.y[0, 0].tolist() for p in packs] == [[0.0, 1.0, 2.0, 3.0, 4.0]] * 2
    for a, b in zip(deltas[0], deltas[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_given_order_generator_reproduces_the_simulators_pack() -> None:
    """What ``--transport grpc`` relies on: a device handed ``shuffle_rng(seed, round, user)`` packs the
    very batches the in-process simulator packs for that user and round."""
    from fedrecon.core.algorithm import FedRecon
    from fedrecon.simulations.runner import SimulationSettings, local_rng, pack_group, shuffle_rng

    algorithm = FedRecon(MatrixFactorization(NUM_ITEMS, 2),
                         FedReconConfig(shuffle_each_round=True, **CAPPED))  # type: ignore[arg-type]
    simulated = pack_group(algorithm, [_client()], [7], settings=SimulationSettings(batch_size=5, seed=3),
                           round_num=4)
    device = pack_clients(algorithm.model, [_client()], algorithm.config, batch_size=5,
                          local_rngs=[local_rng(3, 4, 7)], order_rngs=[shuffle_rng(3, 4, 7)])
    for a, b in ((simulated.reconstruction, device.reconstruction),
                 (simulated.post_reconstruction, device.post_reconstruction)):
        np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(simulated.locals[0], device.locals[0])
    unshuffled = pack_group(FedRecon(algorithm.model, algorithm.config.replace(shuffle_each_round=False)),
                            [_client()], [7], settings=SimulationSettings(batch_size=5, seed=3), round_num=4)
    assert not np.array_equal(simulated.post_reconstruction.y, unshuffled.post_reconstruction.y)


def test_the_tff_backend_refuses_it() -> None:
    from fedrecon.simulations.tff_backend import TffEngine

    model = MatrixFactorization(NUM_ITEMS, 2, local_init="zeros")
    with pytest.raises(ValueError, match="shuffle_each_round"):
        TffEngine(model, FedReconConfig(shuffle_each_round=True), {}, batch_size=5,
                  initial_globals=model.initial_globals(0))
