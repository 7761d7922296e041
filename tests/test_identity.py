"""Identity from credentials (issue 10, point 3), over real gRPC on loopback.

With authentication on, a client is its credential (token id or client certificate), whatever client id it
asserts: one credential holds one assignment per round (N with ``max_devices`` N), spends its own check-in
budget, and cannot use another's assignment token. Without authentication (the trusted-network mode) ids
are taken at their word and limits apply per network address. Tokens live in the store, so those cases run
on SQLite and PostgreSQL.

Every coordinator here runs on a ``ManualClock``: token buckets do not refill and rounds do not time out
while a test runs, so the counts below are exact whatever the machine's load.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import tls_credentials
from fedrecon.core.aggregation import AggregationConfig
from fedrecon.core.config import FedReconConfig, OptimizerSpec
from fedrecon.protocol import CREDENTIAL_SHARE_HINT
from fedrecon.server.app import TlsFiles, start_server
from fedrecon.server.auth import TokenAuthInterceptor, issue_token
from fedrecon.server.checkpoints import globals_from_bytes
from fedrecon.server.clock import ManualClock
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.identity import Identifier
from fedrecon.server.store import SqlStore, StoreUnavailable
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

SHAPE = (6, 2)  # the model's one global trainable variable, item_embedding


def _task(name: str, **rounds: object) -> TaskSpec:
    settings: dict[str, object] = {
        "clients_per_round": 2, "over_selection": 1.0, "min_reports": 1, "selection_timeout_s": 60.0,
        "reporting_timeout_s": 120.0, "retry_delay_s": (0.05, 0.1), **rounds}
    return TaskSpec(name=name, model={"kind": "matrix_factorization", "num_items": SHAPE[0],
                                      "num_factors": SHAPE[1]},
                    training=FedReconConfig(server_optimizer=OptimizerSpec("sgd", 1.0)),
                    rounds=RoundSettings(**settings),  # type: ignore[arg-type]
                    aggregation=AggregationConfig(max_update_norm=100.0))  # no update here nears the bound


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    url = (f"sqlite:///{tmp_path / 'coordinator.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    with SqlStore(url) as s:
        yield s


@pytest.fixture
def task_name() -> str:
    """A fresh task name: PostgreSQL cases of one module share a database."""
    return f"identity_{secrets.token_hex(4)}"


@dataclass
class Device:
    """One party on the wire: its channel (token or client certificate) and whatever ids it asserts."""

    stub: pb_grpc.CoordinatorStub
    task: str
    token: str | None = None

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def check_in(self, client_id: str) -> pb.CheckInResponse:
        request = pb.CheckInRequest(task_name=self.task, client_id=client_id, protocol_version=1)
        return self.stub.CheckIn(request, metadata=self._metadata, timeout=30)

    def outcome(self, client_id: str) -> str:
        """'assignment', 'retry' or the refusal's status name."""
        try:
            return self.check_in(client_id).WhichOneof("outcome")
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[no-any-return]

    def report(self, client_id: str, round_id: int, token: str, value: float) -> tuple[grpc.StatusCode, str]:
        delta = [np.full(SHAPE, value, np.float32)]
        header = pb.ReportHeader(task_name=self.task, client_id=client_id, round_id=round_id,
                                 assignment_token=token, weight=1.0,
                                 manifest=manifest(["item_embedding"], delta))
        messages = [pb.ReportUpdateRequest(header=header),
                    *[pb.ReportUpdateRequest(chunk=c) for c in chunks(delta)]]
        try:
            response = self.stub.ReportUpdate(iter(messages), metadata=self._metadata, timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details()  # type: ignore[return-value]
        return grpc.StatusCode.OK, response.message


def _device(address: str, task: str, token: str | None = None) -> Device:
    return Device(pb_grpc.CoordinatorStub(grpc.insecure_channel(address)), task, token)


def _step(store: SqlStore, task: str) -> np.ndarray:
    """What the last commit changed: version 1 minus version 0 (server SGD at rate 1: the mean delta)."""
    v0, v1 = (globals_from_bytes(store.get_version(task, v).parameters, ["item_embedding"])[0]
              for v in (0, 1))
    return v1 - v0


def _token_server(store: SqlStore, task: TaskSpec):  # type: ignore[no-untyped-def]
    return start_server(Coordinator(store, task, clock=ManualClock()),
                        interceptors=[TokenAuthInterceptor(store, cache_s=600.0)])


# ----- with tokens ---------------------------------------------------------------------------------------
def test_one_credential_asserting_26_ids_takes_one_slot(store: SqlStore, task_name: str) -> None:
    task = _task(task_name, clients_per_round=6, min_reports=6, max_check_ins_per_minute=600)
    _, mallory_token = issue_token(store, "mallory")
    honest_tokens = [issue_token(store, f"phone-{i}")[1] for i in range(5)]
    with _token_server(store, task) as server:
        mallory = _device(server.address, task_name, mallory_token)
        # The id still has to be a valid one, as without authentication (and a refusal costs no budget).
        assert [mallory.outcome(bad) for bad in ("", "x" * 257)] == ["INVALID_ARGUMENT"] * 2
        answers = [mallory.check_in(f"user-{i}") for i in range(26)]
        assert [a.WhichOneof("outcome") for a in answers] == ["assignment"] + ["retry"] * 25
        assert "this credential already holds 1 assignment in round 1" in answers[1].retry.reason
        honest = [_device(server.address, task_name, t) for t in honest_tokens]
        assignments = [d.check_in(f"phone-{i}").assignment for i, d in enumerate(honest)]
        assert len({a.assignment_token for a in assignments} | {answers[0].assignment.assignment_token}) == 6

        a = answers[0].assignment
        assert mallory.report("user-0", a.round_id, a.assignment_token, 0.5)[0] == grpc.StatusCode.OK
        code, details = mallory.report("user-1", a.round_id, a.assignment_token, 0.75)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "no assignment" in details
        for i, (device, assignment) in enumerate(zip(honest, assignments, strict=True)):
            code, _ = device.report(f"phone-{i}", assignment.round_id, assignment.assignment_token, 0.5)
            assert code == grpc.StatusCode.OK
        assert server.coordinator.version == 1
    (record,) = store.list_rounds(task_name)
    assert (record.num_selected, record.num_accepted) == (6, 6)
    np.testing.assert_allclose(_step(store, task_name), 0.5)  # six updates of 0.5; the 0.75 one is not in


def test_a_victims_id_and_assignment_token_are_useless_to_another_credential(store: SqlStore, task_name: str
                                                                             ) -> None:
    task = _task(task_name, clients_per_round=1, over_selection=2.0)
    _, victim_token = issue_token(store, "victim")
    _, mallory_token = issue_token(store, "mallory")
    with _token_server(store, task) as server:
        victim = _device(server.address, task_name, victim_token)
        mallory = _device(server.address, task_name, mallory_token)
        mine = victim.check_in("victim").assignment
        theirs = mallory.check_in("victim").assignment  # the victim's id, mallory's own credential
        assert theirs.assignment_token and theirs.assignment_token != mine.assignment_token

        for claimed in ("victim", "mallory"):  # the stolen token, under either id
            code, details = mallory.report(claimed, mine.round_id, mine.assignment_token, 100.0)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "no assignment" in details
        r = server.coordinator._round
        assert r is not None and r.aggregate.num_updates == 0
        assert not r.refused  # nothing was recorded against the victim
        assert victim.check_in("victim").assignment.assignment_token == mine.assignment_token

        code, _ = victim.report("victim", mine.round_id, mine.assignment_token, 0.25)
        assert code == grpc.StatusCode.OK and server.coordinator.version == 1
    np.testing.assert_allclose(_step(store, task_name), 0.25)  # the victim's update alone


def test_check_ins_under_a_victims_id_spend_the_senders_budget(store: SqlStore, task_name: str) -> None:
    task = _task(task_name, max_check_ins_per_minute=60)  # 10 at once, then one a second (none here)
    _, victim_token = issue_token(store, "victim")
    _, mallory_token = issue_token(store, "mallory")
    with _token_server(store, task) as server:
        mallory = _device(server.address, task_name, mallory_token)
        flood = Counter(mallory.outcome("victim") for _ in range(12))
        assert flood == {"assignment": 10, "RESOURCE_EXHAUSTED": 2}
        with pytest.raises(grpc.RpcError) as caught:
            mallory.check_in("someone-new")  # inventing ids adds no budget
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from this credential" in caught.value.details()
        victim = _device(server.address, task_name, victim_token)
        victims = Counter(victim.outcome("victim") for _ in range(11))
        assert victims == {"assignment": 10, "RESOURCE_EXHAUSTED": 1}  # its whole budget, untouched
        assert server.coordinator.refusals["check_in_rate"] == 4


def test_a_credential_for_three_devices_holds_three_assignments(store: SqlStore, task_name: str) -> None:
    task = _task(task_name, clients_per_round=8, max_check_ins_per_minute=60)
    _, gateway_token = issue_token(store, "gateway", max_devices=3)
    with _token_server(store, task) as server:
        gateway = _device(server.address, task_name, gateway_token)
        answers = [gateway.check_in(f"gw-{i}") for i in range(10)]
        tokens = [a.assignment.assignment_token for a in answers[:3]]
        assert all(a.WhichOneof("outcome") == "assignment" for a in answers[:3]) and len(set(tokens)) == 3
        for a in answers[3:]:
            assert a.WhichOneof("outcome") == "retry"
            assert "already holds 3 assignments" in a.retry.reason and CREDENTIAL_SHARE_HINT in a.retry.reason
        assert gateway.check_in("gw-0").assignment.assignment_token == tokens[0]
        # Within the credential the devices are told apart by id: gw-1 cannot report with gw-0's token.
        a0 = answers[0].assignment
        code, _ = gateway.report("gw-1", a0.round_id, a0.assignment_token, 1.0)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Three devices' budget (3 x 10 at once): 11 check-ins so far, 19 more, then refusals.
        assert Counter(gateway.outcome(f"gw-{i % 5}") for i in range(20)) == {"assignment": 12, "retry": 7,
                                                                             "RESOURCE_EXHAUSTED": 1}
        assert server.coordinator.refusals["assignments_capped"] == 14


# ----- with mutual TLS -----------------------------------------------------------------------------------
def test_client_certificates_are_identities(pki: dict[str, Path], tmp_path: Path) -> None:
    task = _task("mtls", clients_per_round=1, over_selection=3.0, max_check_ins_per_minute=600)

    def device(who: str) -> Device:
        credentials = tls_credentials(pki["ca"].read_bytes(), cert_chain=pki[f"{who}_cert"].read_bytes(),
                                      private_key=pki[f"{who}_key"].read_bytes())
        return Device(pb_grpc.CoordinatorStub(grpc.secure_channel(server.address, credentials)), "mtls")

    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, task, clock=ManualClock()),
                         tls=TlsFiles(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])) as server:
        victim, mallory = device("client"), device("other_client")
        mine = victim.check_in("victim").assignment
        theirs = mallory.check_in("victim").assignment  # the victim's id, mallory's own certificate
        assert theirs.assignment_token and theirs.assignment_token != mine.assignment_token
        assert Counter(mallory.outcome(f"user-{i}") for i in range(26)) == {"retry": 26}  # one slot each
        code, _ = mallory.report("victim", mine.round_id, mine.assignment_token, 100.0)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert victim.report("victim", mine.round_id, mine.assignment_token, 0.25)[0] == grpc.StatusCode.OK
        assert server.coordinator.version == 1
        np.testing.assert_allclose(_step(store, "mtls"), 0.25)


# ----- without authentication: the trusted-network mode --------------------------------------------------
def test_the_trusted_network_mode_limits_per_address(tmp_path: Path) -> None:
    task = _task("trusted", clients_per_round=8, max_assignments_per_peer=2, max_check_ins_per_minute=60,
                 max_check_ins_per_minute_per_peer=120)  # per id 10 at once, per address 20
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, task, clock=ManualClock())) as server:
        host = _device(server.address, "trusted")  # every call comes from 127.0.0.1
        answers = [host.check_in(f"id-{i}") for i in range(5)]
        assert [a.WhichOneof("outcome") for a in answers] == ["assignment"] * 2 + ["retry"] * 3
        assert "this network address already holds 2 assignments" in answers[2].retry.reason
        # Ids are taken at their word here: anyone on the network gets id-0's assignment by asking.
        assert host.check_in("id-0").assignment.assignment_token == answers[0].assignment.assignment_token
        # One id flooding is stopped by its own budget (10) and costs the address only what it was allowed.
        assert Counter(host.outcome("flood") for _ in range(15)) == {"retry": 10, "RESOURCE_EXHAUSTED": 5}
        # Ids invented on one host share its budget: 16 of 20 spent, so 4 more answers.
        assert Counter(host.outcome(f"new-{i}") for i in range(6)) == {"retry": 4, "RESOURCE_EXHAUSTED": 2}
    assert server.coordinator.refusals["check_in_rate"] == 5
    assert server.coordinator.refusals["peer_check_in_rate"] == 2


# ----- the credential lookup -----------------------------------------------------------------------------
def test_the_devices_of_a_credential_are_looked_up_once_and_outages_are_not_remembered() -> None:
    calls: Counter[int] = Counter()
    down = True

    def devices_of(credential_id: int) -> int:
        calls[credential_id] += 1
        if down:
            raise StoreUnavailable("the database is unavailable")
        return 3

    identifier = Identifier(tokens=True, devices_of=devices_of)
    with pytest.raises(StoreUnavailable):
        identifier.identify("a", token="frc_7_secret", client_cert_pem=None, peer="ipv4:127.0.0.1:5")
    down = False
    callers = [identifier.identify(f"d-{i % 4}", token="frc_7_secret", client_cert_pem=None,
                                   peer="ipv4:127.0.0.1:5") for i in range(50)]
    assert calls == {7: 2}  # the failure, then one lookup for 50 calls
    assert {c.group for c in callers} == {"cred:7"} and len({c.key for c in callers}) == 4
    assert {c.max_assignments for c in callers} == {3}


def test_a_store_outage_while_identifying_a_caller_is_unavailable(postgres_url: str, task_name: str) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3",
                            autocommit=True)

    def allow_connections(allowed: bool) -> None:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(database), sql.Literal(allowed)))
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (database,))

    with admin, SqlStore(postgres_url) as store:
        _, known_token = issue_token(store, "known")
        _, new_token = issue_token(store, "new")
        with _token_server(store, _task(task_name, clients_per_round=4)) as server:
            known, new = (_device(server.address, task_name, t) for t in (known_token, new_token))
            assigned = known.check_in("known").assignment.assignment_token  # its credential is looked up now
            new.stub.GetLatestModel(pb.GetLatestModelRequest(task_name=task_name), metadata=new._metadata,
                                    timeout=30)  # its token is verified (and remembered), its devices not
            allow_connections(False)
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    new.check_in("new")
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert known.check_in("known").assignment.assignment_token == assigned  # no store query
            finally:
                allow_connections(True)
            assert new.check_in("new").WhichOneof("outcome") == "assignment"


# ----- the CLI -----------------------------------------------------------------------------------------
def test_the_client_command_says_when_a_token_is_short_of_devices(tmp_path: Path) -> None:
    """``fedrecon client --users 3 --token T`` runs three users under one credential: with a one-device
    token two are capped and the command says how to issue one for three; with ``max_devices=3`` all
    three take part."""
    runner = CliRunner()
    for max_devices, accepted in ((1, 1), (3, 3)):
        model = {"kind": "matrix_factorization", "num_items": 600, "num_factors": 4}
        task = TaskSpec(name="cli", model=model,
                        rounds=RoundSettings(clients_per_round=3, min_reports=1, over_selection=1.0,
                                             retry_delay_s=(0.05, 0.1)))
        with SqlStore(f"sqlite:///{tmp_path / f'{max_devices}.db'}") as store:
            _, token = issue_token(store, "harness", max_devices=max_devices)
            with _token_server(store, task) as server:
                ran = runner.invoke(app, ["client", "--task", "cli", "--data", "synthetic", "--users", "3",
                                          "--coordinator", server.address, "--token", token,
                                          "--max-wait", "60"])
        assert ran.exit_code == 0, ran.output
        assert f"accepted {accepted}" in ran.output
        capped = "2 of 3 users were capped" in ran.output and "token issue --max-devices 3" in ran.output
        assert capped == (max_devices == 1), ran.output


def test_a_caller_is_identified_without_the_store_only_once_its_credential_is_known() -> None:
    calls: Counter[int] = Counter()

    def devices_of(credential_id: int) -> int:
        calls[credential_id] += 1
        return 2

    identifier = Identifier(tokens=True, devices_of=devices_of)
    ask = {"token": "frc_9_secret", "client_cert_pem": None, "peer": "ipv4:127.0.0.1:5"}
    assert identifier.identify_known("a", **ask) is None and not calls  # unknown: the store must say
    looked_up = identifier.identify("a", **ask)
    assert identifier.identify_known("a", **ask) == looked_up and calls == {9: 1}
    trusted = {"token": None, "client_cert_pem": None, "peer": "ipv4:10.0.0.1:5"}
    assert Identifier().identify_known("a", **trusted) == Identifier().identify("a", **trusted)
    with pytest.raises(ValueError):
        identifier.identify_known("a", token=None, client_cert_pem=None, peer="ipv4:127.0.0.1:5")
