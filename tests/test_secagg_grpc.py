"""Secure aggregation through the real coordinator and client library over gRPC on loopback (SQLite, and
PostgreSQL when it is there).

Each client runs ``client.secure_report.SecureReporter`` (what ``FederatedClient.participate`` runs for a
secure round) in its own thread with a hand-made update, so the numbers can be checked by hand and no
TensorFlow is needed: a round commits the plaintext aggregate within the quantisation error; 30% of the
clients vanishing after the key-sharing stage are recovered; too many vanishing fail the round before
anything is unmasked and the next round commits; a hostile client gets a clear status for every bad
message and the round loses nothing; and every array the coordinator's secure-aggregation server receives
is a masked vector, never a client's quantised update. The last test takes the app's path instead: devices
that reconstruct and train on real data call ``FederatedClient.participate()`` in a secure round.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.client import secure_report
from fedrecon.client.secure_report import SecureReporter
from fedrecon.client.transport import CoordinatorChannel, RetryPolicy
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.secagg import SecAggServer
from fedrecon.core.secagg.messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedrecon.protocol import Assignment, ReportOutcome
from fedrecon.secagg_wire import ClientMessage, SecureParameters
from fedrecon.server.app import start_server
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec

NAMES = ["item_embedding"]
CAP = 5 * 50  # TaskSpec's batch_size × FedReconConfig's post_recon_steps_max: the weight cap W
SHAPE = (30, 4)
MODEL = {"kind": "matrix_factorization", "num_items": SHAPE[0], "num_factors": SHAPE[1]}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    return str(request.getfixturevalue("postgres_url"))


def secure_task(name: str, clients: int, *, min_reports: int, phase_timeout_s: float = 60.0,
                **aggregation: object) -> TaskSpec:
    return TaskSpec(name=name, model=MODEL,
                    aggregation=AggregationConfig(secure_aggregation=True,  # type: ignore[arg-type]
                                                  secure_phase_timeout_s=phase_timeout_s, **aggregation),
                    rounds=RoundSettings(clients_per_round=clients, over_selection=1.0,
                                         min_reports=min_reports, selection_timeout_s=120.0,
                                         reporting_timeout_s=120.0))


@contextlib.contextmanager
def serving(url: str, task: TaskSpec) -> Iterator[tuple[str, SqlStore]]:
    with SqlStore(url) as store, start_server(Coordinator(store, task)) as server:
        yield server.address, store


def channel_to(address: str) -> CoordinatorChannel:
    return CoordinatorChannel(address, retry=RetryPolicy(give_up_after_s=30.0))


def version(store: SqlStore, task: str, v: int) -> np.ndarray:
    return globals_from_bytes(store.get_version(task, v).parameters, NAMES)[0]


class Vanish(Exception):
    """A client that stops answering (its process died, its network went away)."""


def vanishing_at(stage: str) -> type[SecureReporter]:
    """A reporter that takes part until ``stage`` and then never answers again."""
    class Vanishing(SecureReporter):
        def on_roster(self, roster: KeyRoster) -> ClientMessage:
            if stage == "shares":
                raise Vanish
            return super().on_roster(roster)

        def on_delivery(self, delivery: ShareDelivery) -> ClientMessage:
            if stage == "masked_input":
                raise Vanish
            return super().on_delivery(delivery)

        def on_unmask_request(self, request: UnmaskRequest) -> ClientMessage:
            if stage == "unmasking":
                raise Vanish
            return super().on_unmask_request(request)
    return Vanishing


def run_round(address: str, task: str, updates: Sequence[np.ndarray], weights: Sequence[float], *,
              reporters: Callable[[int], type[SecureReporter]] = lambda i: SecureReporter,
              prefix: str = "client") -> list[ReportOutcome | None]:
    """Every client checks in (in order, so client i gets secure-aggregation id i + 1), then all run the
    secure protocol at once, each in its own thread; None for a client that vanished."""
    channels = [channel_to(address) for _ in updates]
    assignments = []
    for i, channel in enumerate(channels):
        a = channel.check_in(task, f"{prefix}-{i}")
        assert isinstance(a, Assignment) and a.secure_aggregation, f"{prefix}-{i}: {a}"
        assignments.append(a)
    outcomes: list[ReportOutcome | None] = [None] * len(updates)
    errors: list[BaseException] = []

    def take_part(i: int) -> None:
        try:
            outcomes[i] = reporters(i)(channels[i], assignments[i], f"{prefix}-{i}", [updates[i]], weights[i],
                                       rng=np.random.default_rng(i), max_wait_s=240.0).run()
        except Vanish:
            pass
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=take_part, args=(i,)) for i in range(len(updates))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for channel in channels:
        channel.close()
    assert not any(t.is_alive() for t in threads), "a client never finished"
    if errors:
        raise errors[0]
    return outcomes


def plaintext_mean(updates: Sequence[np.ndarray], weights: Sequence[float], *, bound: float = 20.0,
                   cap: float = CAP) -> np.ndarray:
    """What the plain aggregation stages give: weights capped, updates clipped to the bound."""
    w = np.minimum(np.asarray(weights, np.float64), cap)
    clipped = [u * min(1.0, bound / np.linalg.norm(u)) for u in updates]
    return sum(wi * u.astype(np.float64) for wi, u in zip(w, clipped, strict=True)) / w.sum()


def random_updates(n: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 0.05, SHAPE).astype(np.float32) for _ in range(n)]
    updates[0] *= 2000  # norm ≈ 1,000: clipped to 20 on the client
    return updates, [float(w) for w in rng.integers(1, 40, n)]


def test_a_secure_round_commits_the_plaintext_aggregate_and_the_coordinator_sees_only_masked_vectors(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[np.ndarray] = []  # every vector the coordinator's secure-aggregation server is given
    quantised: list[np.ndarray] = []  # every client's plain quantised update (client side)
    taken = SecAggServer.receive_masked_input
    quantise = secure_report.quantised_update

    def receive(server: SecAggServer, message: MaskedInput) -> None:
        received.append(np.array(message.values, copy=True))
        taken(server, message)

    def quantised_update(*args: object, **kwargs: object) -> np.ndarray:
        q = quantise(*args, **kwargs)  # type: ignore[arg-type]
        quantised.append(q.copy())
        return q

    monkeypatch.setattr(SecAggServer, "receive_masked_input", receive)
    monkeypatch.setattr(secure_report, "quantised_update", quantised_update)
    name = "secure-commit"
    updates, weights = random_updates(5, seed=1)
    weights[1] = 1e6  # claims a million examples: capped to W on its own device
    with serving(store_url, secure_task(name, 5, min_reports=3)) as (address, store):
        g0 = version(store, name, 0)
        with contextlib.closing(channel_to(address)) as plain:  # a plain report to a secure round is refused
            a = plain.check_in(name, "client-0")
            assert isinstance(a, Assignment)
            with pytest.raises(grpc.RpcError) as caught:
                plain.report(a, "client-0", NAMES, [updates[0]], weights[0], {})
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "secure aggregation" in caught.value.details()
        outcomes = run_round(address, name, updates, weights)
        (record,) = store.list_rounds(name)
        g1 = version(store, name, 1)
    assert record.state == RoundState.COMMITTED and record.num_accepted == 5
    assert record.stages == ("client_weight_cap", "client_norm_clip", "secure_sum", "weighted_mean")
    assert all(o is not None and o.in_round and o.committed_version == 1 for o in outcomes), outcomes
    # The server step is SGD at rate 1: the new model is the old one plus the mean, within quantisation.
    n = 5
    step = 2 * 20.0 / ((2**32 - 1) // n)  # one quantisation level (clip 20, headroom for 5 clients)
    total_weight = min(weights[1], CAP) + sum(w for i, w in enumerate(weights) if i != 1)
    bound = n * step * CAP / total_weight * 2  # rounding of the sums and of the weight
    np.testing.assert_allclose(g1 - g0, plaintext_mean(updates, weights), atol=bound, rtol=0)
    assert record.total_weight == pytest.approx(total_weight, abs=n * step * CAP)
    # What the coordinator held: five masked vectors, none a client's quantised update, each far outside
    # the range of a quantised value (at most L = (2^32 - 1) / 5): masked values are uniform on 2^32.
    assert len(received) == 5 and len(quantised) == 5
    levels = (2**32 - 1) // n
    for vector in received:
        assert vector.dtype == np.uint32 and vector.shape == (SHAPE[0] * SHAPE[1] + 1,)
        assert not any(np.array_equal(vector, q) for q in quantised)
        assert max(int(q.max()) for q in quantised) <= levels
        assert (vector > levels).mean() > 0.6  # about 1 - 1/5 of uniform values; a quantised update has 0


@pytest.mark.parametrize("stage", ["masked_input", "unmasking"])
def test_thirty_percent_vanishing_after_sharing_keys_are_recovered(store_url: str, stage: str) -> None:
    name = f"secure-dropouts-{stage.replace('_', '-')}"
    updates, weights = random_updates(10, seed=2)
    gone = {2, 5, 7}
    with serving(store_url, secure_task(name, 10, min_reports=5, phase_timeout_s=3.0)) as (address, store):
        g0 = version(store, name, 0)
        outcomes = run_round(address, name, updates, weights,
                             reporters=lambda i: vanishing_at(stage) if i in gone else SecureReporter)
        (record,) = store.list_rounds(name)
        g1 = version(store, name, 1)
    assert record.state == RoundState.COMMITTED
    in_sum = [i for i in range(10) if stage == "unmasking" or i not in gone]
    assert record.num_accepted == len(in_sum)
    assert all(outcomes[i] is None for i in gone)
    assert all(o.in_round and o.committed_version == 1 for i, o in enumerate(outcomes) if i not in gone
               for o in [o] if o is not None)
    # A client that vanished before its masked input is not in the sum; one that vanished after it is.
    expected = plaintext_mean([updates[i] for i in in_sum], [weights[i] for i in in_sum])
    step = 2 * 20.0 / ((2**32 - 1) // 10)
    np.testing.assert_allclose(g1 - g0, expected, atol=10 * step * CAP * 2, rtol=0)


def test_too_many_vanishing_fail_the_round_before_unmasking_and_the_next_round_commits(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    finished: list[SecAggServer] = []
    finish = SecAggServer.finish

    def counted_finish(server: SecAggServer):  # type: ignore[no-untyped-def]
        finished.append(server)
        return finish(server)

    monkeypatch.setattr(SecAggServer, "finish", counted_finish)
    name = "secure-below-threshold"
    updates, weights = random_updates(5, seed=3)
    gone = {0, 2, 4}  # 2 of 5 left: the threshold is 3 of each client's 4 neighbours
    with serving(store_url, secure_task(name, 5, min_reports=2, phase_timeout_s=3.0)) as (address, store):
        g0 = version(store, name, 0)
        outcomes = run_round(address, name, updates, weights,
                             reporters=lambda i: vanishing_at("masked_input") if i in gone
                             else SecureReporter)
        # The clients are answered from the coordinator's memory; the store's record of the failure is
        # written just after, outside its lock: wait for it (generous bound, a busy machine).
        give_up = time.monotonic() + 60
        while (failed := store.list_rounds(name)[0]).state == RoundState.OPEN and time.monotonic() < give_up:
            time.sleep(0.05)
        assert failed.state == RoundState.FAILED
        assert "at least 3" in (failed.failure_reason or ""), failed.failure_reason
        assert not finished  # failed at the masking stage's close: no secret was reconstructed
        for i in set(range(5)) - gone:
            outcome = outcomes[i]
            assert outcome is not None and not outcome.in_round and outcome.status == "ABORTED"
        assert store.latest_version(name).version == 0
        # The next round, with everyone answering, commits.
        outcomes = run_round(address, name, updates, weights, prefix="again")
        rounds = sorted(store.list_rounds(name), key=lambda r: r.round_num)
        g1 = version(store, name, 1)
    assert [r.state for r in rounds] == [RoundState.FAILED, RoundState.COMMITTED]
    assert all(o is not None and o.committed_version == 1 for o in outcomes)
    np.testing.assert_allclose(g1 - g0, plaintext_mean(updates, weights), atol=1e-4, rtol=0)


def expect_status(code: grpc.StatusCode, call: Callable[[], object], *words: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    assert all(w in details for w in words), details
    return details


class Hostile(SecureReporter):
    """Before each correct message, sends the wrong ones and checks each is refused with a clear status."""

    keys: KeyAdvertisement

    def send(self, message: ClientMessage | None) -> object:
        return self.transport.secure_aggregation(self.assignment, self.client_id, message)

    def on_parameters(self, instruction: SecureParameters) -> ClientMessage:
        keys = super().on_parameters(instruction)
        assert isinstance(keys, KeyAdvertisement)
        values = np.zeros(instruction.parameters.vector_length, np.uint32)
        expect_status(grpc.StatusCode.FAILED_PRECONDITION, lambda: self.send(MaskedInput(0, values)),
                      "advertise stage")
        expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                      lambda: self.send(KeyAdvertisement(0, b"short", keys.encryption_public_key,
                                                         keys.self_seed_commitment)), "public key")
        wrong = self.assignment
        self.assignment = type(wrong)(**{**wrong.__dict__, "token": "stolen"})
        expect_status(grpc.StatusCode.PERMISSION_DENIED, lambda: self.send(None), "no assignment")
        self.assignment = type(wrong)(**{**wrong.__dict__, "round_id": wrong.round_id + 1000})
        expect_status(grpc.StatusCode.FAILED_PRECONDITION, lambda: self.send(None), "not open")
        self.assignment = wrong
        self.keys = keys
        return keys

    def on_roster(self, roster: KeyRoster) -> ClientMessage:
        self.send(self.keys)  # a replay of the accepted message (stage closed since) is answered OK
        other = KeyAdvertisement(0, self.keys.encryption_public_key, self.keys.mask_public_key,
                                 self.keys.self_seed_commitment)
        expect_status(grpc.StatusCode.FAILED_PRECONDITION, lambda: self.send(other), "share stage")
        shares = super().on_roster(roster)
        assert isinstance(shares, EncryptedShares)
        first = shares.shares[0]
        stray = EncryptedShares(0, (*shares.shares[1:], EncryptedShare(first.owner, 99, first.ciphertext)))
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.send(stray), "not its")
        self.send(shares)  # taken (the stage waits for a client that vanished, until its deadline) ...
        self.send(shares)  # ... and a retry is answered as the first was
        flipped = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
        tampered = EncryptedShares(0, (EncryptedShare(first.owner, first.recipient, flipped),
                                       *shares.shares[1:]))
        expect_status(grpc.StatusCode.ALREADY_EXISTS, lambda: self.send(tampered), "already sent")
        return shares

    def on_delivery(self, delivery: ShareDelivery) -> ClientMessage:
        masked = super().on_delivery(delivery)
        assert isinstance(masked, MaskedInput)
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.send(MaskedInput(0, masked.values[:-1])),
                      "shape")
        odd = self.transport.stub.SecureAggregation
        from fedrecon.v1 import coordinator_pb2 as pb

        bad_bytes = pb.SecureAggregationRequest(
            task_name=self.assignment.task_name, client_id=self.client_id, round_id=self.assignment.round_id,
            assignment_token=self.assignment.token, masked_input=pb.SecAggMaskedInput(values=b"\x01\x02\x03"))
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: odd(bad_bytes), "multiple of 4")
        return masked

    def on_unmask_request(self, request: UnmaskRequest) -> ClientMessage:
        answer = super().on_unmask_request(request)
        assert isinstance(answer, UnmaskResponse) and answer.self_seed_shares
        first = answer.self_seed_shares[0]
        both = UnmaskResponse(0, answer.self_seed_shares, (RevealedShare(first.owner, first.x, first.share),))
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.send(both), "both secrets")
        return answer


def test_a_hostile_client_gets_clear_statuses_and_the_round_loses_nothing(store_url: str) -> None:
    name = "secure-hostile"
    updates, weights = random_updates(5, seed=4)
    # Client 4 vanishes before sharing keys, so the share stage stays open for the hostile client's
    # second message until its deadline (10 s).
    with serving(store_url, secure_task(name, 5, min_reports=4, phase_timeout_s=10.0)) as (address, store):
        g0 = version(store, name, 0)
        roles = {3: Hostile, 4: vanishing_at("shares")}
        outcomes = run_round(address, name, updates, weights,
                             reporters=lambda i: roles.get(i, SecureReporter))
        (record,) = store.list_rounds(name)
        g1 = version(store, name, 1)
    assert record.state == RoundState.COMMITTED and record.num_accepted == 4
    assert all(o is not None and o.committed_version == 1 for o in outcomes[:4]) and outcomes[4] is None
    np.testing.assert_allclose(g1 - g0, plaintext_mean(updates[:4], weights[:4]), atol=1e-4, rtol=0)


def test_devices_that_train_take_part_through_participate(tmp_path: Path) -> None:
    """The app's path: three ``FederatedClient``s with real data reconstruct, train and call
    ``participate()`` in a secure round; it commits the plaintext mean of their own updates (recomputed from
    the same seeds) within the quantisation error."""
    from concurrent.futures import ThreadPoolExecutor

    from fedrecon.client import FederatedClient
    from fedrecon.client.participant import client_step_for
    from fedrecon.core.client_work import client_update
    from fedrecon.simulations.ratings import load_dataset

    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:3]
    task = TaskSpec(name="secure-devices", model={"kind": "matrix_factorization", "num_items": data.num_items,
                                                  "num_factors": 4},
                    aggregation=AggregationConfig(secure_aggregation=True, secure_phase_timeout_s=120.0),
                    rounds=RoundSettings(clients_per_round=3, over_selection=1.0, min_reports=3,
                                         selection_timeout_s=120.0, reporting_timeout_s=240.0))
    assigned: dict[int, Assignment] = {}

    def play(k: int) -> tuple[ReportOutcome, list[np.ndarray], object]:
        def rng_for(a: Assignment) -> np.random.Generator:
            assigned[k] = a
            return np.random.default_rng(100 + k)

        with FederatedClient(address, task.name, f"device-{k}", data.train[users[k]]) as client:
            outcome = client.participate(rng_for=rng_for, upload_rng_for=lambda a: np.random.default_rng(k),
                                         max_wait_s=240.0)
            _, globals_ = client.globals_for(assigned[k].model_version)
            return outcome, globals_, client.model_examples()

    with serving(f"sqlite:///{tmp_path / 'coordinator.db'}", task) as (address, store):
        with ThreadPoolExecutor(3) as pool:
            played = list(pool.map(play, range(3)))
        (record,) = store.list_rounds(task.name)
        g0, g1 = (globals_from_bytes(store.get_version(task.name, v).parameters, NAMES)[0] for v in (0, 1))
    assert all(o.accepted and o.in_round and o.committed_version == 1 for o, _, _ in played), played
    assert record.state == RoundState.COMMITTED and "secure_sum" in record.stages
    a = assigned[0]
    step = client_step_for(a.model_spec_json, a.training_config_json)
    updates, weights = [], []
    for k, (_, globals_, examples) in enumerate(played):
        update = client_update(step, globals_, examples, batch_size=a.batch_size,  # type: ignore[arg-type]
                               rng=np.random.default_rng(100 + k))
        (delta,) = update.delta
        updates.append(delta)
        weights.append(float(update.weight))
    assert any(np.abs(u).max() > 1e-3 for u in updates)  # they trained: a mean worth comparing
    levels = (2**32 - 1) // 3
    bound = 3 * (2 * 20.0 / levels) * CAP / sum(min(w, CAP) for w in weights) * 2 + 1e-6
    np.testing.assert_allclose(g1 - g0, plaintext_mean(updates, weights), atol=bound, rtol=0)
