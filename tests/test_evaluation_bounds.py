"""One evaluator cannot poison a version's pooled metrics, flood the store, or break ``fedrecon status``
(issue 10, point 7). Real gRPC on loopback, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.server.app import RunningServer, start_server
from fedrecon.server.auth import TokenAuthInterceptor, issue_token
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.evaluations import MAX_EVALUATION_EXAMPLES, EvaluationLimits
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = TaskSpec(name="evals", model={"kind": "matrix_factorization", "num_items": 20, "num_factors": 2},
                rounds=RoundSettings(clients_per_round=2, min_reports=1))


@dataclass
class Served:
    store: SqlStore
    coordinator: Coordinator
    server: RunningServer
    clock: ManualClock

    def stub(self, token: str | None = None) -> pb_grpc.CoordinatorStub:
        channel = grpc.insecure_channel(self.server.address)
        if token is not None:
            channel = grpc.intercept_channel(channel, _Bearer(token))
        return pb_grpc.CoordinatorStub(channel)


class _Bearer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        details = details._replace(metadata=self.metadata)
        return continuation(details, request)


@pytest.fixture
def served(request: pytest.FixtureRequest, db_url: str) -> Iterator[Served]:
    """A coordinator over gRPC; with ``indirect`` parameter True it requires client tokens."""
    clock = ManualClock()
    with SqlStore(db_url) as store:
        coordinator = Coordinator(store, TASK, clock=clock)
        interceptors = [TokenAuthInterceptor(store)] if getattr(request, "param", False) else []
        with start_server(coordinator, interceptors=interceptors) as server:
            yield Served(store, coordinator, server, clock)


def _evaluation(client: str, squared_error: float, num_correct: float, num_examples: float,
                version: int = 0) -> pb.ReportEvaluationRequest:
    return pb.ReportEvaluationRequest(task_name="evals", client_id=client, model_version=version,
                                      squared_error=squared_error, num_correct=num_correct,
                                      num_examples=num_examples)


def _refused(stub: pb_grpc.CoordinatorStub, request: pb.ReportEvaluationRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ReportEvaluation(request, timeout=10)
    return raised.value


def test_evaluations_must_be_possible_reports(served: Served) -> None:
    stub = served.stub()
    stub.ReportEvaluation(_evaluation("a", 4.0, 3, 4), timeout=10)  # mse 1.0 over 4 examples
    stub.ReportEvaluation(_evaluation("b", 2.0, 1, 1), timeout=10)  # mse 2.0 over 1
    honest = served.store.evaluation_summaries("evals")[0].metrics()["rmse"]
    assert honest == pytest.approx(math.sqrt(6 / 5))  # pooled: (4 + 2) / (4 + 1)

    bad = {  # what the issue saw, and its relatives: all INVALID_ARGUMENT, none stored
        "1e9 perfect examples": _evaluation("x", 0.0, 1e9, 1e9),
        "just over the cap": _evaluation("x", 0.0, 0, MAX_EVALUATION_EXAMPLES + 1),
        "a fractional count": _evaluation("x", 1.0, 0.5, 2),
        "more correct than examples": _evaluation("x", 1.0, 3, 2),
        "negative error": _evaluation("x", -1.0, 0, 2),
        "infinite error": _evaluation("x", math.inf, 0, 2),
        "NaN examples": _evaluation("x", 1.0, 0, math.nan),
        "near 1e308": _evaluation("x", 1.7e308, 0, 2),
    }
    served.coordinator.evaluation_limits = EvaluationLimits.for_output_range(1.0, 5.0)
    for what, request in bad.items():
        err = _refused(stub, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.details())
    assert served.coordinator.refusals["bad_evaluation"] == len(bad)
    assert _refused(stub, _evaluation("x", 1.0, 0, 2, version=7)).code() == grpc.StatusCode.NOT_FOUND
    (v0,) = served.store.evaluation_summaries("evals")
    assert (v0.num_clients, v0.squared_error, v0.num_examples) == (2, 6.0, 5.0)

    # The worst one hostile evaluator can do under the cap: MSE between S/(N + n) and (S + 16 n)/(N + n).
    stub.ReportEvaluation(_evaluation("x", 0.0, MAX_EVALUATION_EXAMPLES, MAX_EVALUATION_EXAMPLES), timeout=10)
    low = served.store.evaluation_summaries("evals")[0].metrics()["rmse"]
    assert low == pytest.approx(math.sqrt(6 / (5 + MAX_EVALUATION_EXAMPLES)))  # 0.0245: bounded, not 0.0003
    stub.ReportEvaluation(_evaluation("x", 16.0 * MAX_EVALUATION_EXAMPLES, 0, MAX_EVALUATION_EXAMPLES),
                          timeout=10)  # the same caller again: replaces its first report
    high = served.store.evaluation_summaries("evals")[0].metrics()["rmse"]
    n = MAX_EVALUATION_EXAMPLES
    assert high == pytest.approx(math.sqrt((6 + 16 * n) / (5 + n)))
    assert high < 4.0  # never above the largest error the rating range allows
    assert _refused(stub, _evaluation("y", 16.0 * 10 + 1, 0, 10)).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("served", [True], indirect=True, ids=["tokens"])
def test_evaluations_are_rate_limited_per_credential(served: Served) -> None:
    _, device = issue_token(served.store, "phone")
    _, gateway = issue_token(served.store, "gateway", max_devices=4)

    def send(token: str, count: int) -> list[str]:
        stub = served.stub(token)
        outcomes = []
        for i in range(count):  # a fresh client id every time: the credential is the identity
            try:
                stub.ReportEvaluation(_evaluation(f"id-{i}", 1.0, 1, 2), timeout=10)
                outcomes.append("OK")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
        return outcomes

    # 6 a minute per device, a burst of 3: the 500 calls of the issue store one evaluation, not 500.
    assert send(device, 20) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 17
    # 4 devices: 4 times the budget, and at most 4 distinct evaluators of the version.
    assert send(gateway, 20) == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 16
    (v0,) = served.store.evaluation_summaries("evals")
    assert v0.num_clients == 1 + 4  # the phone is one evaluator whatever ids it claims; the gateway's 4
    served.clock.now += 10.0  # a minute's budget refills at 6 a minute: one more report after 10 s
    assert send(device, 2) == ["OK", "RESOURCE_EXHAUSTED"]
    assert served.coordinator.refusals["evaluation_rate"] == 17 + 8 + 1
    assert served.coordinator.refusals["evaluation_devices"] == 8  # ids 4..11, while the rate budget lasted
    assert served.store.evaluation_summaries("evals")[0].num_clients == 5  # the phone's report replaced


def test_status_never_breaks_on_what_is_stored(served: Served, db_url: str) -> None:
    for key in ("a" * 40, "b" * 40):  # what a release without bounds let two clients store
        served.store.record_evaluation("evals", 0, key, squared_error=1.7e308, num_correct=1, num_examples=2)
    runner = CliRunner()
    as_json = runner.invoke(app, ["status", "--store", db_url, "--json"])
    assert as_json.exit_code == 0, as_json.output
    (evaluation,) = json.loads(as_json.output)["tasks"][0]["evaluations"]
    assert evaluation == {"version": 0, "clients": 2, "examples": 4.0, "mse": None, "rmse": None,
                          "accuracy": 0.5}
    human = runner.invoke(app, ["status", "--store", db_url])
    assert human.exit_code == 0, human.output
    assert "evaluation of version 0: 2 clients, 4 examples, RMSE n/a, accuracy 0.5000" in human.output


def test_a_large_evaluation_counts_as_the_task_weight_cap() -> None:
    """A valid report of more examples than the weight cap counts as that many, its per-example sums kept:
    4,000 perfect examples against a cap of 250 pull a pooled MSE of 2.0 over 100 examples to
    200 / 350 = 0.5714, not to 200 / 4100 = 0.0488."""
    limits = EvaluationLimits(counted_examples=250)
    assert limits.counted(0.0, 4000, 4000) == (0.0, 250.0, 250.0)
    assert limits.counted(80.0, 10, 40) == (80.0, 10, 40)  # under the cap: as claimed
    se, correct, n = limits.counted(2000.0, 1000, 4000)
    assert (se, correct, n) == (125.0, 62.5, 250.0)  # 0.5 per example and 25% correct, kept
    honest_se, honest_n = 200.0, 100
    hostile_se, _, hostile_n = limits.counted(0.0, 4000, 4000)
    pooled = (honest_se + hostile_se) / (honest_n + hostile_n)
    assert pooled == pytest.approx(200 / 350)
