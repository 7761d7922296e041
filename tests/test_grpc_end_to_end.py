"""The platform end to end over real gRPC on loopback: coordinator + store + client library on MovieLens.

Covers: rounds with 24 clients commit and improve validation RMSE; the store holds every version and round
(SQLite and PostgreSQL); what crosses the wire carries no local variable; a model larger than the message
limit streams in chunks; refusals arrive as the right gRPC status and leave the aggregate untouched; the
client honours retry windows and rides out a coordinator restart; personalization for unseen users.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedrecon.client import FederatedClient, ModelFile, NoAssignment, Personalization, RetryPolicy
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import RoundState, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import FederatedRatings, load_dataset
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

CLIENTS = 24


@contextlib.contextmanager
def serving(task: TaskSpec, tmp_path: Path, **options: int) -> Iterator[RunningServer]:
    """A coordinator for ``task`` on a fresh SQLite store, listening on a free loopback port."""
    with SqlStore(f"sqlite:///{tmp_path / 'coordinator.db'}") as store, \
            start_server(Coordinator(store, task), **options) as server:
        yield server


@pytest.fixture(scope="module")
def movielens(ml_2998_dir: Path) -> FederatedRatings:
    return load_dataset(str(ml_2998_dir), seed=42)


def movielens_task(data: FederatedRatings, **rounds: object) -> TaskSpec:
    settings = {"clients_per_round": CLIENTS, "over_selection": 1.0, "min_reports": CLIENTS,
                "selection_timeout_s": 60.0, "reporting_timeout_s": 120.0, "retry_delay_s": (0.05, 0.2),
                **rounds}
    return TaskSpec(
        name="movielens",
        model={"kind": "matrix_factorization", "num_items": data.num_items, "num_factors": 20,
               "use_biases": True, "initial_offset": round(data.mean_rating, 4)},
        training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 3.0)),
        rounds=RoundSettings(**settings))  # type: ignore[arg-type]


class WireRecorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor):
    """Keeps every request message a client sends, exactly as serialized for the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def _keep(self, method: str, message: object) -> None:
        with self._lock:
            self.sent.append((method, message.SerializeToString()))  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._keep(details.method, request)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._keep(details.method, request)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        def tee() -> Iterator[object]:
            for message in request_iterator:
                self._keep(details.method, message)
                yield message

        return continuation(details, tee())


def _run_round(address: str, data: FederatedRatings, users: list[int], *, channel: grpc.Channel | None = None
               ) -> list[bool]:
    def one(user: int) -> bool:
        client = FederatedClient(None if channel else address, "movielens", f"user-{user}", data.train[user],
                                 channel=channel)
        return client.participate(max_wait_s=60.0).accepted

    threads: list[threading.Thread] = []
    results: list[bool] = []
    for u in users:
        t = threading.Thread(target=lambda u=u: results.append(one(u)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(120)
    return results


def _validation_rmse(address: str, data: FederatedRatings, users: list[int]) -> float:
    """Each validation user evaluates itself on-device and reports its sums; RMSE over all of them."""
    sums = [FederatedClient(address, "movielens", f"val-{u}", data.validation[u]).evaluate(
        rng=np.random.default_rng(u)) for u in users]
    return float(np.sqrt(sum(s.squared_error for s in sums) / sum(s.num_examples for s in sums)))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rounds_commit_improve_validation_and_are_all_in_the_store(
        backend: str, movielens: FederatedRatings, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path / 'coordinator.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    rounds = 3
    users = sorted(movielens.train)[:CLIENTS * rounds]
    val_users = sorted(movielens.validation)[:40]
    with SqlStore(url) as store:
        with start_server(Coordinator(store, movielens_task(movielens))) as server:
            before = _validation_rmse(server.address, movielens, val_users)
            for r in range(rounds):
                chosen = users[r * CLIENTS:(r + 1) * CLIENTS]
                assert _run_round(server.address, movielens, chosen) == [True] * CLIENTS
                assert server.coordinator.version == r + 1
            after = _validation_rmse(server.address, movielens, val_users)
        assert after < before - 0.01, (before, after)

        versions = store.list_versions("movielens")
        assert [(v.version, v.parent) for v in versions] == [(0, None), (1, 0), (2, 1), (3, 2)]
        recorded = store.list_rounds("movielens")
        assert [(r.round_num, r.state, r.num_accepted, r.new_version) for r in recorded] == [
            (i + 1, RoundState.COMMITTED, CLIENTS, i + 1) for i in range(rounds)]
        assert all(len(store.participations(r.round_id)) == CLIENTS for r in recorded)
        evaluations = {e.version: e for e in store.evaluation_summaries("movielens")}
        assert evaluations[0].num_clients == evaluations[3].num_clients == len(val_users)
        assert evaluations[3].metrics()["rmse"] == pytest.approx(after)


def test_nothing_local_crosses_the_wire(movielens: FederatedRatings, tmp_path: Path) -> None:
    recorder = WireRecorder()
    with serving(movielens_task(movielens), tmp_path) as server:
        channel = grpc.intercept_channel(grpc.insecure_channel(server.address), recorder)
        assert _run_round(server.address, movielens, sorted(movielens.train)[:CLIENTS],
                          channel=channel) == [True] * CLIENTS
        model = server.coordinator.model
    local_names = [v.name.encode() for v in model.local_variables]
    assert local_names == [b"user_embedding", b"user_bias"]
    for _, raw in recorder.sent:
        assert not any(name in raw for name in local_names)
    reports = [raw for method, raw in recorder.sent if method.endswith("/ReportUpdate")]
    headers = [m.header for m in map(pb.ReportUpdateRequest.FromString, reports) if m.HasField("header")]
    assert len(headers) == CLIENTS
    trainable = [model.global_variables[i] for i in model.global_trainable]
    expected_bytes = sum(int(np.prod(v.shape)) * 4 for v in trainable)
    for header in headers:
        assert [t.name for t in header.manifest.tensors] == ["item_embedding", "item_bias", "global_bias"]
        assert set(header.metrics) == {"post_recon_examples", "loss", "finite"}
    payload = sum(len(m.chunk.data) for m in map(pb.ReportUpdateRequest.FromString, reports)
                  if m.HasField("chunk"))
    assert payload == CLIENTS * expected_bytes  # exactly the global deltas, not one byte more


def test_a_model_larger_than_the_message_limit_streams_in_chunks(movielens: FederatedRatings,
                                                                 tmp_path: Path) -> None:
    limit = 64 * 1024
    task = movielens_task(movielens, clients_per_round=2, min_reports=2)
    with serving(task, tmp_path, max_message_bytes=limit) as server:
        model_bytes = sum(int(np.prod(v.shape)) * 4 for v in server.coordinator.model.global_variables)
        assert model_bytes > 4 * limit
        assert _run_round(server.address, movielens, sorted(movielens.train)[:2]) == [True, True]
        assert server.coordinator.version == 1
        # One message over the limit is refused by the transport, before the coordinator sees it.
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
        big = pb.ReportUpdateRequest(chunk=pb.TensorChunk(data=b"\0" * (2 * limit)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ReportUpdate(iter([big]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _header(a: pb.Assignment, client: str, names: list[str], arrays: list[np.ndarray], weight: float = 1.0
            ) -> pb.ReportUpdateRequest:
    return pb.ReportUpdateRequest(header=pb.ReportHeader(
        task_name="movielens", client_id=client, round_id=a.round_id, assignment_token=a.assignment_token,
        weight=weight, manifest=manifest(names, arrays)))


def test_refusals_arrive_as_grpc_statuses_and_change_nothing(movielens: FederatedRatings, tmp_path: Path
                                                             ) -> None:
    task = movielens_task(movielens, clients_per_round=2, min_reports=2)
    with serving(task, tmp_path) as server:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
        coordinator = server.coordinator

        def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            return caught.value.code(), caught.value.details()

        unknown = pb.CheckInRequest(task_name="books", client_id="a", protocol_version=1)
        assert code_of(lambda: stub.CheckIn(unknown))[0] == grpc.StatusCode.NOT_FOUND
        code, details = code_of(lambda: stub.CheckIn(pb.CheckInRequest(task_name="movielens", client_id="a",
                                                                       protocol_version=9)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "protocol version 9" in details
        a = stub.CheckIn(pb.CheckInRequest(task_name="movielens", client_id="a",
                                           protocol_version=1)).assignment
        names = ["item_embedding", "item_bias", "global_bias"]
        good = [np.zeros((movielens.num_items, 20), np.float32), np.zeros(movielens.num_items, np.float32),
                np.zeros((), np.float32)]
        nan = [g.copy() for g in good]
        nan[1][3] = np.nan

        def report(messages: list[pb.ReportUpdateRequest]) -> tuple[grpc.StatusCode, str]:
            return code_of(lambda: stub.ReportUpdate(iter(messages), timeout=30))

        cases = {
            "no header": ([pb.ReportUpdateRequest(chunk=pb.TensorChunk(data=b"x"))],
                          grpc.StatusCode.INVALID_ARGUMENT, "must start with its header"),
            "local variable named": ([_header(a, "a", ["user_embedding", *names[1:]], good)],
                                     grpc.StatusCode.INVALID_ARGUMENT, "unknown: ['user_embedding']"),
            "wrong shape": ([_header(a, "a", names, [good[0][:5], *good[1:]])],
                            grpc.StatusCode.INVALID_ARGUMENT, "shape [5, 20]"),
            "stops half way": ([_header(a, "a", names, good), *[pb.ReportUpdateRequest(chunk=c) for c in
                                                                  list(chunks(good, 4096))[:3]]],
                               grpc.StatusCode.INVALID_ARGUMENT, "stream ended after"),
            "forged token": ([_header(pb.Assignment(round_id=a.round_id, assignment_token="x"), "a", names,
                                      good)], grpc.StatusCode.PERMISSION_DENIED, "no assignment"),
        }
        for name, (messages, want, text) in cases.items():
            code, details = report(messages)
            assert code == want and text in details, (name, code, details)
        code, details = report([_header(a, "a", names, nan), *[pb.ReportUpdateRequest(chunk=c)
                                                               for c in chunks(nan)]])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
        assert coordinator._round is not None and coordinator._round.aggregate.num_updates == 0
        assert coordinator.version == 0


def test_over_selected_clients_get_a_refused_round_report(movielens: FederatedRatings, tmp_path: Path
                                                           ) -> None:
    task = movielens_task(movielens, clients_per_round=2, min_reports=2, over_selection=1.5)
    users = sorted(movielens.train)[:3]
    with serving(task, tmp_path) as server:
        clients = [FederatedClient(server.address, "movielens", f"u{u}", movielens.train[u]) for u in users]
        assignments = [c.check_in() for c in clients]  # goal ceil(2 * 1.5) = 3: all three are assigned
        assert len({a.round_id for a in assignments}) == 1
        reports = []
        for client, assignment in zip(clients, assignments, strict=True):
            names, update = client.train(assignment)
            try:
                response = client.transport.report(assignment, client.client_id, names, update.delta,
                                                   update.weight, update.metrics)
                reports.append(("OK", response.accepted))
            except grpc.RpcError as err:
                reports.append((err.code().name, False))
        assert reports == [("OK", True), ("OK", True), ("ABORTED", False)]
        # Through participate() the same refusal is a ReportOutcome, not an exception that loses the round.
        third = clients[2]
        third.check_in = lambda **_: assignments[2]  # type: ignore[method-assign]
        refused = third.participate()
        assert (refused.status, refused.accepted, refused.in_round) == ("ABORTED", False, False)
        assert "is over" in refused.message


def test_download_refuses_unknown_tasks_and_tiny_chunks(movielens: FederatedRatings, tmp_path: Path) -> None:
    with serving(movielens_task(movielens), tmp_path) as server:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
        good = list(stub.DownloadModel(pb.DownloadModelRequest(task_name="movielens", model_version=0)))
        assert good[0].HasField("manifest")
        tiny = list(stub.DownloadModel(pb.DownloadModelRequest(task_name="movielens", model_version=0,
                                                               max_chunk_bytes=1)))
        assert max(len(m.chunk.data) for m in tiny[1:]) == 64 * 1024  # clamped up from 1 byte
        for task, version, code in (("books", 0, grpc.StatusCode.NOT_FOUND),
                                    ("movielens", 7, grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.DownloadModel(pb.DownloadModelRequest(task_name=task, model_version=version)))
            assert caught.value.code() == code


def test_client_honours_the_retry_window(movielens: FederatedRatings, tmp_path: Path) -> None:
    task = movielens_task(movielens, clients_per_round=1, min_reports=1, retry_delay_s=(0.3, 0.6))
    slept: list[float] = []
    with serving(task, tmp_path) as server:
        u0, u1 = sorted(movielens.train)[:2]
        first = FederatedClient(server.address, "movielens", "first", movielens.train[u0])
        first.check_in()  # takes the only seat of round 1 and keeps it
        def sleep(seconds: float) -> None:  # really waits: honest clients stay under the check-in rate limit
            slept.append(seconds)
            time.sleep(seconds)

        late = FederatedClient(server.address, "movielens", "late", movielens.train[u1], sleep=sleep)
        with pytest.raises(NoAssignment, match="has selected its clients"):
            late.check_in(max_wait_s=3.0)
    assert len(slept) >= 4 and all(0.3 <= s <= 0.6 for s in slept)


def test_client_rides_out_a_coordinator_restart(movielens: FederatedRatings, tmp_path: Path) -> None:
    task = movielens_task(movielens, clients_per_round=1, min_reports=1)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with SqlStore(url) as store:
        server = start_server(Coordinator(store, task))
        port = server.port
        server.stop()
    user = sorted(movielens.train)[0]
    client = FederatedClient(f"127.0.0.1:{port}", "movielens", "patient", movielens.train[user],
                             retry=RetryPolicy(initial_s=0.05, max_s=0.3, give_up_after_s=30))
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(client.participate(max_wait_s=30)))
    worker.start()
    time.sleep(1.0)  # the client is retrying UNAVAILABLE meanwhile
    with SqlStore(url) as store, start_server(Coordinator(store, task), port=port) as again:
        worker.join(60)
        assert again.coordinator.version == 1
    assert len(outcome) == 1 and outcome[0].accepted  # type: ignore[attr-defined]


def test_personalization_for_an_unseen_user(movielens: FederatedRatings, tmp_path: Path) -> None:
    task = movielens_task(movielens, clients_per_round=4, min_reports=4)
    user = sorted(movielens.test)[0]
    examples = movielens.test[user]
    rated = set(int(i) for i in examples.x)
    with serving(task, tmp_path) as server:
        assert _run_round(server.address, movielens, sorted(movielens.train)[:4]) == [True] * 4
        client = FederatedClient(server.address, "movielens", "new-user", examples)
        mine = client.personalize(rng=np.random.default_rng(3))
        names, arrays = server.coordinator.model_arrays("movielens", 1)
    assert mine.version == 1
    top = mine.recommend(10)
    assert len(top) == 10 and not rated & {i for i, _ in top}
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    assert np.isfinite(mine.predict(np.asarray(sorted(rated)))).all()
    # The same version from an exported file gives the same personalization (no coordinator needed).
    path = tmp_path / "model.npz"
    ModelFile("movielens", 1, task.model, names, arrays, task.training.to_dict(), task.batch_size).save(path)
    offline = Personalization.from_model_file(str(path), examples, rng=np.random.default_rng(3))
    for a, b in zip(mine.locals, offline.locals, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    again = offline.recommend(10)
    assert [i for i, _ in again] == [i for i, _ in top]
    np.testing.assert_allclose([s for _, s in again], scores, rtol=1e-5)


def test_the_client_library_does_not_import_the_server() -> None:
    code = ("import sys, fedrecon.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic', 'psycopg') "
            "or m.startswith('fedrecon.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
