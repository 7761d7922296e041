"""Observing a running coordinator (issue 14): the gRPC health service follows the store, the Prometheus
endpoint counts what happened, the JSON log is one object per line without secrets, and ``status`` shows
the live round from the running coordinator.

Everything is real: gRPC on loopback (ports 0), HTTP scrapes of the metrics endpoint, SQLite files and the
PostgreSQL server, and ``fedrecon serve`` in its own process. Reports are sent as raw protobuf messages
(numpy deltas), so the figures checked are known exactly: the bytes counted must equal the bytes sent.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.server.app import start_server
from fedrecon.server.auth import TokenAuthInterceptor, issue_token
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.live_view import RoundEvent, RoundEventKind, RoundPhase
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.tensors import chunks, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

TASK = "observed"
MODEL = {"kind": "matrix_factorization", "num_items": 6, "num_factors": 2}
WAIT_S = 90.0  # a bound for conditions on a busy machine, never a sleep
COORDINATOR = "/fedrecon.v1.Coordinator/"


def _task() -> TaskSpec:
    """Commits at 2 accepted reports; selects 3 (over-selection 1.5), so one may be refused."""
    return TaskSpec(name=TASK, model=MODEL, rounds=RoundSettings(
        clients_per_round=2, over_selection=1.5, min_reports=2, selection_timeout_s=600.0,
        reporting_timeout_s=600.0, retry_delay_s=(0.05, 0.1), max_check_ins_per_minute=1e6))


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)


def _health(address: str) -> int:
    """The overall health status (SERVING = 1, NOT_SERVING = 2), asked without any credential."""
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                         timeout=10).status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Wire:
    """A raw client of the coordinator service that keeps the size of every message it sends and gets."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CoordinatorStub(self._channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def _count(self, method: str, sent: Sequence[bytes], received: Sequence[bytes]) -> None:
        self.sent[method] = self.sent.get(method, 0) + sum(len(m) for m in sent)
        self.received[method] = self.received.get(method, 0) + sum(len(m) for m in received)

    def check_in(self, client: str) -> pb.Assignment:
        request = pb.CheckInRequest(task_name=TASK, client_id=client, protocol_version=1)
        response = self.stub.CheckIn(request, metadata=self.metadata, timeout=30)
        self._count("CheckIn", [request.SerializeToString()], [response.SerializeToString()])
        assert response.WhichOneof("outcome") == "assignment", response
        return response.assignment

    def report(self, client: str, a: pb.Assignment, delta: np.ndarray) -> pb.ReportUpdateResponse:
        messages = [pb.ReportUpdateRequest(header=pb.ReportHeader(
            task_name=TASK, client_id=client, round_id=a.round_id, assignment_token=a.assignment_token,
            weight=1.0, manifest=manifest(["item_embedding"], [delta])))]
        messages += [pb.ReportUpdateRequest(chunk=c) for c in chunks([delta], 16)]
        try:
            response = self.stub.ReportUpdate(iter(messages), metadata=self.metadata, timeout=60)
        finally:
            self._count("ReportUpdate", [m.SerializeToString() for m in messages], [])
        self._count("ReportUpdate", [], [response.SerializeToString()])
        return response

    def download(self, version: int) -> int:
        request = pb.DownloadModelRequest(task_name=TASK, model_version=version)
        replies = list(self.stub.DownloadModel(request, metadata=self.metadata, timeout=60))
        self._count("DownloadModel", [request.SerializeToString()], [m.SerializeToString() for m in replies])
        return len(replies)

    def close(self) -> None:
        self._channel.close()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape over HTTP: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _one_round(wire: Wire) -> None:
    """alice and bob report, carol's update is not finite (refused: non_finite); the round commits at 2."""
    delta = np.full((6, 2), 0.01, np.float32)
    a, b, c = (wire.check_in(who) for who in ("alice", "bob", "carol"))
    assert wire.report("alice", a, delta).accepted
    with pytest.raises(grpc.RpcError) as refused:
        wire.report("carol", c, np.full((6, 2), np.nan, np.float32))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wire.report("bob", b, delta).accepted


# ----- the live view and round events ---------------------------------------------------------------------
def test_view_and_round_events_follow_a_round(tmp_path: Path) -> None:
    events: list[RoundEvent] = []
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        coordinator = Coordinator(store, _task())
        coordinator.add_round_listener(events.append)
        coordinator.add_round_listener(lambda e: 1 / 0)  # a broken listener costs no round
        before = coordinator.view()
        assert (before.task, before.model_version, before.leading, before.live_round) == (TASK, 0, True, None)
        with start_server(coordinator) as server:
            wire = Wire(server.address)
            delta = np.full((6, 2), 0.01, np.float32)
            a, b, c = (wire.check_in(who) for who in ("alice", "bob", "carol"))
            assert wire.report("alice", a, delta).accepted
            live = coordinator.view().live_round
            assert live is not None and live.phase == RoundPhase.REPORTING  # 3 of 3 selected
            assert (live.selected, live.reporting, live.accepted, live.goal, live.selection_goal,
                    live.min_reports, live.base_version) == (3, 1, 1, 2, 3, 2, 0)
            assert 0 < live.seconds_left <= 1200 and live.opened_at < live.deadline_at
            with pytest.raises(grpc.RpcError):
                wire.report("carol", c, np.full((6, 2), np.inf, np.float32))
            assert wire.report("bob", b, delta).accepted
            _wait_for(lambda: coordinator.view().model_version == 1, "version 1")
            wire.close()
        after = coordinator.view()
    assert after.live_round is None and after.reports_accepted == 2 and after.rounds_committed == 1
    assert after.refusals["non_finite"] == 1
    assert [e.kind for e in events] == [RoundEventKind.OPENED, RoundEventKind.COMMITTED]
    committed = events[1]
    assert (committed.round_num, committed.base_version, committed.new_version, committed.why
            ) == (1, 0, 1, "goal")
    assert committed.summary is not None and committed.summary.num_accepted == 2
    assert committed.commit_s is not None and committed.commit_s > 0
    figures = committed.figures()
    assert (figures["accepted"], figures["refused"], figures["refused_by_reason"]
            ) == (2, 1, {"non_finite": 1})
    assert not any(who in json.dumps(figures) for who in ("alice", "bob", "carol"))


# ----- health ---------------------------------------------------------------------------------------------
def test_health_follows_the_sqlite_file_and_needs_no_token(tmp_path: Path) -> None:
    """SERVING while the store answers; NOT_SERVING while its file is gone (moved away: the store refuses
    to write into a file that is not the one it opened); SERVING again when it is back. Probes carry no
    token although every coordinator call needs one."""
    db = tmp_path / "s.db"
    with SqlStore(f"sqlite:///{db}") as store:
        _, token = issue_token(store, "device")
        auth = TokenAuthInterceptor(store)
        with start_server(Coordinator(store, _task()), interceptors=[auth], health_probe_s=0.1) as server:
            assert _health(server.address) == SERVING  # the first answer is the first probe's
            wire = Wire(server.address)
            with pytest.raises(grpc.RpcError) as refused:
                wire.check_in("alice")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            db.rename(tmp_path / "away.db")
            _wait_for(lambda: _health(server.address) == NOT_SERVING, "NOT_SERVING without the file")
            (tmp_path / "away.db").rename(db)
            _wait_for(lambda: _health(server.address) == SERVING, "SERVING with the file back")
            assert Wire(server.address, token).check_in("alice").round_num == 1  # and it serves


def test_health_follows_postgresql(postgres_url: str, pg_outage: Any) -> None:
    """The same over PostgreSQL: its database refuses connections and its sessions are cut, then not."""
    outage = pg_outage
    with SqlStore(postgres_url) as store, \
            start_server(Coordinator(store, _task()), health_probe_s=0.1) as server:
        assert _health(server.address) == SERVING
        outage.start()
        _wait_for(lambda: _health(server.address) == NOT_SERVING, "NOT_SERVING during the outage")
        outage.end()
        _wait_for(lambda: _health(server.address) == SERVING, "SERVING after the outage")


# ----- metrics --------------------------------------------------------------------------------------------
def test_metrics_count_a_committed_round(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task()), metrics_port=0) as server:
        assert server.metrics_endpoint is not None
        url = server.metrics_endpoint.url
        idle = _scrape(url)
        assert idle[("fedrecon_rounds_total", (("outcome", "committed"),))] == 0
        assert idle[("fedrecon_live_round_open", ())] == 0
        wire = Wire(server.address)
        wire.download(0)
        _one_round(wire)
        _wait_for(lambda: server.coordinator.version == 1, "version 1")
        wire.download(1)
        wire.close()
        m = _scrape(url)
    assert m[("fedrecon_rounds_total", (("outcome", "committed"),))] == 1
    assert m[("fedrecon_rounds_total", (("outcome", "failed"),))] == 0
    assert m[("fedrecon_reports_total", (("reason", ""), ("status", "accepted")))] == 2
    assert m[("fedrecon_reports_total", (("reason", "non_finite"), ("status", "refused")))] == 1
    assert m[("fedrecon_refusals_total", (("reason", "non_finite"),))] == 1
    assert m[("fedrecon_round_duration_seconds_count", (("outcome", "committed"),))] == 1
    assert m[("fedrecon_round_commit_duration_seconds_count", ())] == 1
    assert m[("fedrecon_round_commit_duration_seconds_sum", ())] > 0
    assert m[("fedrecon_model_version", ())] == 1 and m[("fedrecon_leader", ())] == 1
    assert m[("fedrecon_live_round_open", ())] == 0
    assert m[("fedrecon_live_round_selected_clients", ())] == 0
    assert m[("fedrecon_store_operation_duration_seconds_count", (("operation", "commit_round"),))] == 1
    assert m[("fedrecon_store_operation_duration_seconds_count", (("operation", "open_round"),))] == 1
    assert ("fedrecon_open_streams", (("kind", "reports"),)) in m
    for method in ("CheckIn", "ReportUpdate", "DownloadModel"):  # exactly the protobuf bytes on the wire
        labels = (("method", COORDINATOR + method),)
        assert m[("fedrecon_grpc_received_bytes_total", labels)] == wire.sent[method], method
        assert m[("fedrecon_grpc_sent_bytes_total", labels)] == wire.received[method], method
    assert wire.received["DownloadModel"] > 2 * 6 * 2 * 4  # two versions of 12 float32s, and framing


def test_store_errors_are_counted_by_kind(tmp_path: Path) -> None:
    """A store operation that meets an outage counts as unavailable; a refusal (an unknown version) is an
    answer, not an error."""
    from fedrecon.server.metrics import CoordinatorMetrics, observe_store_calls
    from fedrecon.server.store import StoreVanished, UnknownVersion

    db = tmp_path / "s.db"
    metrics = CoordinatorMetrics()
    with SqlStore(f"sqlite:///{db}") as store:
        Coordinator(store, _task())
        observe_store_calls(store, metrics.on_store_call)
        with pytest.raises(ValueError, match="observed already"):
            observe_store_calls(store, metrics.on_store_call)
        with pytest.raises(UnknownVersion):
            store.get_version(TASK, 7)
        db.rename(tmp_path / "away.db")
        with pytest.raises(StoreVanished):
            store.ping()
    value = metrics.registry.get_sample_value
    assert value("fedrecon_store_operation_duration_seconds_count", {"operation": "get_version"}) == 1
    assert value("fedrecon_store_errors_total", {"operation": "get_version", "kind": "fault"}) is None
    assert value("fedrecon_store_errors_total", {"operation": "ping", "kind": "fault"}) == 1


# ----- the service as operators run it: fedrecon serve, JSON logs, status ---------------------------------
TASK_FILE = f"""
name = "{TASK}"
[model]
kind = "matrix_factorization"
num_items = 6
num_factors = 2
[rounds]
clients_per_round = 2
over_selection = 1.5
min_reports = 2
selection_timeout_s = 600.0
reporting_timeout_s = 600.0
retry_delay_s = [0.05, 0.1]
max_check_ins_per_minute = 1000000.0
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[CoordinatorProcess, str, str]]:
    """``fedrecon serve`` with JSON logs, metrics on a free port and tokens required: (process, store URL,
    token)."""
    task = tmp_path / "task.toml"
    task.write_text(TASK_FILE)
    store = f"sqlite:///{tmp_path / 'fedrecon.db'}"
    with SqlStore(store) as sql:
        _, token = issue_token(sql, "gateway", max_devices=3)
    process = CoordinatorProcess(task, store, tmp_path, extra_args=[
        "--log-format", "json", "--metrics-port", "0", "--require-token", "--health-probe-s", "0.2",
        "--reflection"])
    try:
        yield process, store, token
    finally:
        process.stop()


def _log_lines(process: CoordinatorProcess) -> list[dict[str, object]]:
    """Every line of the process's log, each parsed as one JSON object (a line that is not fails)."""
    return [json.loads(line) for line in process.log_text().splitlines() if line.strip()]


def test_serve_logs_json_and_status_shows_the_live_round(served: tuple[CoordinatorProcess, str, str]
                                                          ) -> None:
    process, store, token = served
    _wait_for(lambda: any(e["event"] == "listening" for e in _log_lines(process)), "the listening line")
    (listening,) = [e for e in _log_lines(process) if e["event"] == "listening"]
    metrics = str(listening["metrics"])
    assert metrics.startswith("http://127.0.0.1:") and metrics.endswith("/metrics")
    assert _health(process.address) == SERVING  # no token, while every coordinator call needs one

    wire = Wire(process.address, token)
    delta = np.full((6, 2), 0.01, np.float32)
    a, b, c = (wire.check_in(who) for who in ("alice-device", "bob-device", "carol-device"))
    assert wire.report("alice-device", a, delta).accepted
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "--store", store, "--json", "--metrics-url", metrics])
    assert shown.exit_code == 0, shown.output
    (task,) = json.loads(shown.output)["tasks"]
    live = task["live_round"]
    assert (live["source"], live["phase"], live["round_num"], live["selected"], live["reporting"],
            live["accepted"], live["goal"], live["min_reports"]) == ("coordinator", "reporting", 1, 3, 1, 1,
                                                                      2, 2)
    assert 0 < live["seconds_left"] <= 1200 and json.loads(shown.output)["coordinator"]["leader"] is True
    human = runner.invoke(app, ["status", "--store", store, "--metrics-url", metrics.split("//")[1]
                                .removesuffix("/metrics")])
    assert human.exit_code == 0 and "live round 1 (reporting, on version 0): 3 selected" in human.output

    with pytest.raises(grpc.RpcError):
        wire.report("carol-device", c, np.full((6, 2), np.nan, np.float32))
    assert wire.report("bob-device", b, delta).accepted
    _wait_for(lambda: any(e["event"] == "round_committed" for e in _log_lines(process)), "the commit line")
    wire.close()
    assert process.stop() == 0

    # The coordinator is gone: status says so and shows the store's record (no round is open now).
    gone = runner.invoke(app, ["status", "--store", store, "--json", "--metrics-url", metrics])
    assert gone.exit_code == 0, gone.output
    report = json.loads(gone.output)
    assert "unreachable" in report["coordinator"] and report["tasks"][0]["live_round"] is None

    lines = _log_lines(process)  # every line is one JSON object
    assert {"ts", "level", "logger", "event", "message"} <= set(lines[0])
    events = [e["event"] for e in lines]
    assert events.count("round_opened") == 1 and events.count("round_committed") == 1
    (opened,) = [e for e in lines if e["event"] == "round_opened"]
    assert (opened["round_num"], opened["base_version"], opened["goal"], opened["selection_goal"]
            ) == (1, 0, 2, 3)
    (committed,) = [e for e in lines if e["event"] == "round_committed"]
    assert (committed["new_version"], committed["accepted"], committed["refused"], committed["selected"],
            committed["refused_by_reason"]) == (1, 2, 1, 3, {"non_finite": 1})
    assert committed["commit_s"] > 0 and committed["duration_s"] >= 0
    (refusals,) = [e for e in lines if e["event"] == "refusals"]  # the tally at shutdown
    assert refusals["counts"] == {"non_finite": 1}
    text = process.log_text()
    # The secret whole (it may itself hold "_"; a short piece of it could turn up in any log by chance).
    assert token not in text and token.split("_", 2)[2] not in text
    assert not any(who in text for who in ("alice-device", "bob-device", "carol-device"))


# ----- deploy/README: the metrics table and the Prometheus examples ----------------------------------------
DEPLOY_README = Path(__file__).resolve().parents[1] / "deploy" / "README.md"


def _yaml_blocks() -> list[str]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DEPLOY_README.read_text(), re.S | re.M)
    return [b for b in blocks if "scrape_configs" in b or "groups:" in b]


def _documented_metrics() -> set[str]:
    """The metric names in deploy/README's table (its first column)."""
    rows = [line for line in DEPLOY_README.read_text().splitlines() if line.startswith("| `fedrecon_")]
    return {name for row in rows for name in re.findall(r"`(fedrecon_\w+)`", row.split("|")[1])}


def test_the_documented_metrics_are_the_exposed_ones(tmp_path: Path) -> None:
    """Every family a scrape shows (idle, mid-round, after a commit, with DP) is in the table, every name
    in the table is shown by one of them, and the alert rules use only such names."""
    from fedrecon.server.metrics import CoordinatorMetrics

    seen: set[str] = set()

    def families(registry: Any) -> set[str]:
        return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}

    task = _task()
    dp = TaskSpec.from_dict({**task.to_dict(), "privacy": {"epsilon_budget": 100.0}, "aggregation": {
        "noise_multiplier": 1.0, "max_update_norm": 1.0, "weighting": "uniform"}})
    for name, spec in (("plain", task), ("private", dp)):
        with SqlStore(f"sqlite:///{tmp_path / (name + '.db')}") as store, \
                start_server(Coordinator(store, spec), metrics_port=0) as server:
            metrics = server.metrics
            assert isinstance(metrics, CoordinatorMetrics)
            seen |= families(metrics.registry)
            if spec is dp:
                continue  # its privacy gauges are there already (and its accountant is slow to open a round)
            wire = Wire(server.address)
            a, b = wire.check_in("alice"), wire.check_in("bob")
            seen |= families(metrics.registry)  # a live round
            for who, assignment in (("alice", a), ("bob", b)):
                assert wire.report(who, assignment, np.zeros((6, 2), np.float32)).accepted
            _wait_for(lambda: server.coordinator.version == 1, "version 1")
            seen |= families(metrics.registry)  # after a commit
            wire.close()
    documented = _documented_metrics()
    assert seen - documented == set(), "exposed but not in deploy/README"
    assert documented - seen == set(), "in deploy/README but never exposed"
    rules = next(b for b in _yaml_blocks() if "groups:" in b)
    used = set(re.findall(r"\b(fedrecon_\w+)", rules))
    assert used and used <= documented


def test_the_prometheus_examples_pass_promtool(tmp_path: Path, require: Callable[[bool, str], None]) -> None:
    """deploy/alerts.yml holds deploy/README's rules; promtool (Debian's ``prometheus`` package) checks the
    scrape config and the rules, and unit-tests the no-commit alert: it fires after 30 minutes without a
    commit (and 5 of waiting), never while rounds commit."""
    scrape, rules = (next(b for b in _yaml_blocks() if key in b) for key in ("scrape_configs", "groups:"))
    alerts = DEPLOY_README.parent / "alerts.yml"  # the compose file's Prometheus loads this one
    assert yaml.safe_load(alerts.read_text()) == yaml.safe_load(rules), "deploy/alerts.yml != deploy/README"
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (make deploy-tools): the rules were not run")
    assert promtool is not None
    (tmp_path / "prometheus.yml").write_text(scrape + "rule_files: [rules.yml]\n")
    (tmp_path / "rules.yml").write_text(alerts.read_text())
    (tmp_path / "tests.yml").write_text("""
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'fedrecon_rounds_total{job="fedrecon", instance="a", outcome="committed"}'
        values: '0+1x20 20+0x40'  # a commit a minute, then none from minute 20
      - series: 'fedrecon_rounds_total{job="busy", instance="b", outcome="committed"}'
        values: '0+1x60'
    alert_rule_test:
      - eval_time: 45m  # the 30-minute window still holds a commit
        alertname: FedreconNoRoundCommitted
        exp_alerts: []
      - eval_time: 60m  # 30 minutes without one, for 5 minutes
        alertname: FedreconNoRoundCommitted
        exp_alerts:
          - exp_labels: {job: fedrecon, severity: page}
            exp_annotations:
              summary: "no federated round committed in the last 30 minutes"
              description: "see the leader's round_failed log lines and fedrecon_refusals_total by reason"
""")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "tests.yml"]):
        done = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_a_real_prometheus_scrapes_the_coordinator(tmp_path: Path,
                                                   require: Callable[[bool, str], None]) -> None:
    """Debian's Prometheus server, with deploy/README's job name and alert rules, scrapes a live coordinator:
    the target is up, a committed round shows in its time series, and the rules load and evaluate without
    error. This is the scrape path the compose file sets up, minus the containers."""
    prometheus = shutil.which("prometheus")
    require(prometheus is not None, "prometheus not installed (make deploy-tools): no real scrape")
    assert prometheus is not None
    alerts = DEPLOY_README.parent / "alerts.yml"
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store, \
            start_server(Coordinator(store, _task()), metrics_port=0) as server:
        assert server.metrics_endpoint is not None
        target = server.metrics_endpoint.url.split("//", 1)[1].split("/", 1)[0]
        (tmp_path / "rules.yml").write_text(alerts.read_text())
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": "fedrecon", "static_configs": [{"targets": [target]}]}]}))
        with socket.socket() as probe:  # a free loopback port for Prometheus's own API
            probe.bind(("127.0.0.1", 0))
            api = f"http://127.0.0.1:{probe.getsockname()[1]}/api/v1/"
            listen = f"127.0.0.1:{probe.getsockname()[1]}"
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address={listen}"],
                                   stdout=log, stderr=subprocess.STDOUT)

        def query(expression: str) -> list[dict[str, Any]]:
            url = api + "query?" + urllib.parse.urlencode({"query": expression})
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = json.load(response)
            except OSError:
                return []
            assert body["status"] == "success", body
            return list(body["data"]["result"])

        def value(expression: str) -> float | None:
            result = query(expression)
            return float(result[0]["value"][1]) if result else None

        try:
            _wait_for(lambda: value('up{job="fedrecon"}') == 1, "Prometheus sees the coordinator up")
            assert value('fedrecon_rounds_total{job="fedrecon",outcome="committed"}') == 0
            wire = Wire(server.address)
            wire.download(0)
            _one_round(wire)
            wire.close()
            _wait_for(lambda: server.coordinator.version == 1, "version 1")
            _wait_for(lambda: value('fedrecon_rounds_total{job="fedrecon",outcome="committed"}') == 1,
                      "the committed round in Prometheus")
            assert value('fedrecon_model_version{job="fedrecon"}') == 1
            assert value('fedrecon_refusals_total{job="fedrecon",reason="non_finite"}') == 1

            def rules() -> list[dict[str, Any]]:
                with urllib.request.urlopen(api + "rules", timeout=10) as response:
                    return [r for g in json.load(response)["data"]["groups"] for r in g["rules"]]

            expected = {r["alert"] for g in yaml.safe_load(alerts.read_text())["groups"] for r in g["rules"]}
            _wait_for(lambda: {r["name"] for r in rules() if r.get("lastEvaluation", "").startswith("2")
                               and not r["lastEvaluation"].startswith("0001")} >= expected,
                      "every alert rule evaluated")
            assert all(r["health"] == "ok" for r in rules()), rules()
            firing = {r["name"] for r in rules() if r["state"] == "firing"}
            assert "FedreconNoRoundCommitted" not in firing  # a round was just committed
        finally:
            process.terminate()
            process.wait(timeout=60)
            log.close()
