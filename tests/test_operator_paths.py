"""Operator paths a hostile or careless input used to break (issue 10, point 8): token labels, echoed
names, metric maps, and a SQLite file deleted under a running coordinator.

Real gRPC on loopback; the token commands run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import FederatedClient, RetryPolicy
from fedrecon.server.app import start_server
from fedrecon.server.auth import check_token
from fedrecon.server.coordinator import MAX_ECHO_CHARS, MAX_METRICS, Coordinator
from fedrecon.server.store import Outcome, SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

MODEL = {"kind": "matrix_factorization", "num_items": 600, "num_factors": 2}


def _task(**rounds: object) -> TaskSpec:
    settings = {"clients_per_round": 2, "over_selection": 1.0, "min_reports": 2, **rounds}
    return TaskSpec(name="ops", model=MODEL, rounds=RoundSettings(**settings))  # type: ignore[arg-type]


# -- token labels ---------------------------------------------------------------------------------------


def test_token_labels_are_validated_and_printed_as_text(db_url: str) -> None:
    runner = CliRunner()
    markup = "[bold red]kiosk[/] #3"  # rich markup: crashed the print after the credential was stored
    issued = runner.invoke(app, ["token", "issue", "--label", markup, "--max-devices", "5",
                                 "--store", db_url])
    assert issued.exit_code == 0, issued.output
    assert markup in issued.output and "5 devices" in issued.output
    token = issued.output.strip().splitlines()[-1]
    with SqlStore(db_url) as sql:
        assert check_token(sql, token)
        (record,) = sql.list_credentials()
        assert (record.label, record.max_devices) == (markup, 5)

    for label in ("x" * 201, "two\nlines", "escape\x1b[31m"):  # too long (a traceback on PostgreSQL), control
        refused = runner.invoke(app, ["token", "issue", "--label", label, "--store", db_url])
        assert refused.exit_code == 2 and "label must be" in refused.output, refused.output
    assert runner.invoke(app, ["token", "issue", "--label", "x", "--max-devices", "0", "--store", db_url]
                         ).exit_code == 2

    listed = runner.invoke(app, ["token", "list", "--store", db_url], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert markup in listed.output and "│ 5 " in listed.output and token not in listed.output
    with SqlStore(db_url) as sql:
        assert len(sql.list_credentials()) == 1  # the refused labels stored nothing


def test_a_huge_token_id_is_just_an_invalid_token(db_url: str) -> None:
    with SqlStore(db_url) as sql:
        for token in (f"frc_{10**30}_secret", "frc_99999999999_secret", "frc_²_secret", "frc_-1_x"):
            assert not check_token(sql, token)


# -- echoed strings and metric maps ---------------------------------------------------------------------


def test_a_huge_task_name_is_not_echoed_back(tmp_path: Path) -> None:
    name = "n" * (3 << 20)  # 3 MiB
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task()), max_message_bytes=8 << 20) as server:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", 8 << 20)]))
        calls = {
            "CheckIn": lambda: stub.CheckIn(pb.CheckInRequest(task_name=name, client_id="c",
                                                              protocol_version=1), timeout=30),
            "GetLatestModel": lambda: stub.GetLatestModel(pb.GetLatestModelRequest(task_name=name),
                                                          timeout=30),
            "GetRound": lambda: stub.GetRound(pb.GetRoundRequest(task_name=name, round_id=1), timeout=30),
            "ReportEvaluation": lambda: stub.ReportEvaluation(pb.ReportEvaluationRequest(
                task_name=name, client_id="c", num_examples=1), timeout=30),
            "DownloadModel": lambda: list(stub.DownloadModel(pb.DownloadModelRequest(task_name=name),
                                                             timeout=30)),
        }
        for call, send in calls.items():
            with pytest.raises(grpc.RpcError) as raised:
                send()
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, call
            details = raised.value.details()
            assert len(details) < MAX_ECHO_CHARS + 120, (call, len(details))
            assert "'nnnn" in details and "(3145728 chars)" in details, details


def test_metric_maps_in_reports_are_capped(tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:2]
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task(min_reports=1))) as server:
        client = FederatedClient(server.address, "ops", "big", data.train[users[0]])
        assignment = client.check_in(max_wait_s=30)
        names, update = client.train(assignment, np.random.default_rng(0))

        def report(metrics: dict[str, float]) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as raised:
                client.transport.report(assignment, "big", names, update.delta, update.weight, metrics)
            return raised.value

        many = report({f"m{i}": 1.0 for i in range(100_000)})
        assert many.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_METRICS} metrics per report, got 100000" in many.details()
        # The refused report was this client's answer for the round: nothing of it is kept but the reason.
        other = FederatedClient(server.address, "ops", "honest", data.train[users[1]])
        assert other.participate(max_wait_s=30).accepted
        (round_,) = store.list_rounds("ops")
        by_outcome = {p.outcome: p for p in store.participations(round_.round_id)}
        refused = by_outcome[Outcome.REFUSED]
        assert refused.metrics == {} and refused.reason == "bad_metrics"
        assert len(by_outcome[Outcome.ACCEPTED].metrics) < 10

        client2 = FederatedClient(server.address, "ops", "long-key", data.train[users[0]])
        assignment = client2.check_in(max_wait_s=30)
        with pytest.raises(grpc.RpcError) as raised:
            client2.transport.report(assignment, "long-key", names, update.delta, update.weight,
                                     {"k" * 65: 1.0})
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "metric names must be 1 to 64 characters" in raised.value.details()
        assert len(raised.value.details()) < 200


# -- a SQLite file deleted while serving ----------------------------------------------------------------


def test_a_sqlite_file_deleted_while_serving_is_refused_loudly(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    data = load_dataset("synthetic", seed=42)
    users = sorted(data.train)[:2]
    path = tmp_path / "s.db"
    retry = RetryPolicy(initial_s=0.05, max_s=0.2, give_up_after_s=5.0)
    with SqlStore(f"sqlite:///{path}") as store, start_server(Coordinator(store, _task())) as server:
        first, second = (FederatedClient(server.address, "ops", f"u{u}", data.train[u], retry=retry)
                         for u in users)
        assignments = [c.check_in(max_wait_s=30) for c in (first, second)]
        work = [c.train(a, np.random.default_rng(0))
                for c, a in zip((first, second), assignments, strict=True)]
        names, update = work[0]
        assert first.transport.report(assignments[0], "u" + str(users[0]), names, update.delta, update.weight,
                                      update.metrics).accepted
        path.unlink()  # an operator deletes the store mid-round
        names, update = work[1]
        with pytest.raises(grpc.RpcError) as raised:  # the goal is reached, but the commit is refused
            second.transport.report(assignments[1], "u" + str(users[1]), names, update.delta, update.weight,
                                    update.metrics)
        assert raised.value.code() == grpc.StatusCode.ABORTED and "deleted" in raised.value.details()
        assert server.coordinator.version == 0  # no version went into the unlinked file
        with pytest.raises(grpc.RpcError) as again:  # the next round cannot even open: INTERNAL, not UNKNOWN
            stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
            stub.CheckIn(pb.CheckInRequest(task_name="ops", client_id="late", protocol_version=1), timeout=10)
        assert again.value.code() == grpc.StatusCode.INTERNAL
    assert "was deleted while the coordinator was using it" in caplog.text
