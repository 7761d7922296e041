"""Client tokens: issued and revoked from the CLI, stored only as salted hashes, enforced on every RPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import FederatedClient
from fedrecon.server.app import start_server
from fedrecon.server.auth import TokenAuthInterceptor, check_token, issue_token
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc


def test_tokens_are_stored_as_salted_hashes_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqlStore(f"sqlite:///{path}") as store:
        first_id, first = issue_token(store, "phone-1")
        second_id, second = issue_token(store, "phone-2")
        assert (first_id, second_id) == (1, 2) and first.startswith("frc_1_") and second.startswith("frc_2_")
        assert check_token(store, first) and check_token(store, second)
        secret = first.split("_", 2)[2]
        assert not check_token(store, f"frc_1_{secret[:-1]}x")  # wrong secret
        assert not check_token(store, f"frc_2_{secret}")  # right secret, other credential
        for malformed in ("", "frc", "frc_x_y", "abc_1_" + secret, "frc_99_" + secret):
            assert not check_token(store, malformed)
        records = store.list_credentials()
        assert records[0].salt != records[1].salt and len(records[0].secret_hash) == 64
        store.revoke_credential(first_id)
        assert not check_token(store, first) and check_token(store, second)
    raw = path.read_bytes()
    assert secret.encode() not in raw and first.encode() not in raw


def test_every_call_needs_a_valid_unrevoked_token(tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    task = TaskSpec(name="auth", model={"kind": "matrix_factorization", "num_items": 600, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, over_selection=1.0))
    user = sorted(data.train)[0]
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        credential_id, token = issue_token(store, "device")
        auth = TokenAuthInterceptor(store, cache_s=0.0)
        with start_server(Coordinator(store, task), interceptors=[auth]) as server:
            stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(server.address))
            calls = {
                "CheckIn": lambda md: stub.CheckIn(pb.CheckInRequest(task_name="auth", client_id="x",
                                                                     protocol_version=1), metadata=md),
                "DownloadModel": lambda md: list(stub.DownloadModel(
                    pb.DownloadModelRequest(task_name="auth", model_version=0), metadata=md)),
                "ReportUpdate": lambda md: stub.ReportUpdate(iter([pb.ReportUpdateRequest()]), metadata=md),
                "GetLatestModel": lambda md: stub.GetLatestModel(pb.GetLatestModelRequest(task_name="auth"),
                                                                 metadata=md),
                "GetRound": lambda md: stub.GetRound(pb.GetRoundRequest(task_name="auth", round_id=1),
                                                     metadata=md),
            }
            for name, call in calls.items():
                for metadata in (None, (("authorization", "Bearer frc_1_forged"),)):
                    with pytest.raises(grpc.RpcError) as caught:
                        call(metadata)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert server.coordinator.version == 0

            device = FederatedClient(server.address, "auth", "device", data.train[user], token=token)
            report = device.participate()
            assert report.accepted and server.coordinator.version == 1

            store.revoke_credential(credential_id)
            with pytest.raises(grpc.RpcError) as caught:
                FederatedClient(server.address, "auth", "device", data.train[user], token=token).participate()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_commands(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    issued = runner.invoke(app, ["token", "issue", "--label", "tablet", "--store", store])
    assert issued.exit_code == 0, issued.output
    token = issued.output.strip().splitlines()[-1]
    with SqlStore(store) as sql:
        assert check_token(sql, token)
    listed = runner.invoke(app, ["token", "list", "--store", store])
    assert "tablet" in listed.output and "active" in listed.output and token not in listed.output
    assert runner.invoke(app, ["token", "revoke", "1", "--store", store]).exit_code == 0
    with SqlStore(store) as sql:
        assert not check_token(sql, token)
    unknown = runner.invoke(app, ["token", "revoke", "7", "--store", store])
    assert unknown.exit_code == 2 and unknown.stderr.strip() == "no credential 7", unknown.output  # bad input
