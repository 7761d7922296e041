"""``fedrecon client`` as a user meets it: it names its target, fails in seconds with one line when it cannot
connect (nothing listening, TLS against plaintext and the reverse, bad certificate files), exits 1 when
nothing was accepted, speaks mutual TLS, and ends with accepted / committed / refused."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from fedrecon.cli import app
from fedrecon.client import FederatedClient, RetryEvent, RetryPolicy
from fedrecon.protocol import retry_after_metadata
from fedrecon.server.app import TlsFiles, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.process import CoordinatorProcess
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

TASK = """
name = "cli"
batch_size = 5
[model]
kind = "matrix_factorization"
num_items = 600
num_factors = 4
[rounds]
clients_per_round = {clients}
over_selection = 1.0
min_reports = {clients}
selection_timeout_s = 60.0
reporting_timeout_s = 60.0
retry_delay_s = {retry}
max_rounds = {max_rounds}
"""
BOUND_S = 60.0  # generous for a busy machine; the connect timeout given is 2 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def _task_spec() -> TaskSpec:
    return TaskSpec(name="cli", model={"kind": "matrix_factorization", "num_items": 600, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, over_selection=1.0))


@contextmanager
def _serve(tmp_path: Path, *extra: str, max_rounds: int = 5, clients: int = 2, retry: str = "[0.05, 0.2]"
           ) -> Iterator[CoordinatorProcess]:
    task = tmp_path / "task.toml"
    task.write_text(TASK.format(max_rounds=max_rounds, clients=clients, retry=retry))
    server = CoordinatorProcess(task, f"sqlite:///{tmp_path / 'cli.db'}", tmp_path, extra_args=extra)
    try:
        yield server
    finally:
        server.stop(timeout_s=30)


def test_a_server_that_is_down_fails_within_the_connect_timeout_with_one_line() -> None:
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    ran = subprocess.run([sys.executable, "-m", "fedrecon.cli", "client", "--task", "cli", "--data",
                          "synthetic", "--coordinator", f"127.0.0.1:{port}", "--connect-timeout", "2"],
                         capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert took < BOUND_S
    assert "Traceback" not in ran.stdout + ran.stderr
    assert _lines(ran.stdout) == [
        f"connecting to 127.0.0.1:{port} (plaintext)",
        f"fedrecon client: cannot reach the coordinator at 127.0.0.1:{port} (plaintext) within 2 s: is it "
        "running there, and does it speak plaintext?"]


def test_tls_and_plaintext_mismatches_fail_fast(pki: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["client", "--task", "cli", "--data", "synthetic", "--connect-timeout", "2"]
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        with start_server(Coordinator(store, _task_spec()),
                          tls=TlsFiles(pki["server_cert"], pki["server_key"])) as server:
            started = time.monotonic()
            ran = runner.invoke(app, [*args, "--coordinator", server.address])  # no --tls-ca
            assert time.monotonic() - started < BOUND_S
            assert ran.exit_code == 1, ran.output
            assert _lines(ran.output)[0] == f"connecting to {server.address} (plaintext)"
            assert _lines(ran.output)[1:] == [
                f"fedrecon client: cannot reach the coordinator at {server.address} (plaintext) within 2 s: "
                "is it running there, and does it speak plaintext?"]
        with start_server(Coordinator(store, _task_spec())) as server:  # plaintext; the client wants TLS
            ran = runner.invoke(app, [*args, "--coordinator", server.address, "--tls-ca", str(pki["ca"])])
            assert ran.exit_code == 1, ran.output
            assert _lines(ran.output) == [
                f"connecting to {server.address} (TLS)",
                f"fedrecon client: cannot reach the coordinator at {server.address} (TLS) within 2 s: is it "
                "running there, and does it speak TLS?"]


def test_mutual_tls_from_the_command_line(pki: dict[str, Path], tmp_path: Path) -> None:
    """Against ``serve --tls-client-ca``: with --tls-cert/--tls-key the user's reports (one certificate is
    one device) are accepted and committed; the summary counts accepted, committed and refused apart."""
    runner = CliRunner()
    with _serve(tmp_path, "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
                "--tls-client-ca", str(pki["ca"]), clients=1) as server:
        base = ["client", "--task", "cli", "--data", "synthetic", "--users", "1", "--rounds", "2",
                "--coordinator", server.address, "--tls-ca", str(pki["ca"]), "--max-wait", "60"]
        ran = runner.invoke(app, [*base, "--tls-cert", str(pki["client_cert"]), "--tls-key",
                                  str(pki["client_key"])])
        assert ran.exit_code == 0, ran.output
        lines = _lines(ran.output)
        assert lines[0] == f"connecting to {server.address} (TLS)"
        assert lines[-1] == "1 clients: accepted 2 (committed 2 into versions 1-2), refused 0", ran.output

        # Without a client certificate the handshake is refused: one line, exit 1, in seconds.
        ran = runner.invoke(app, [*base, "--connect-timeout", "2"])
        assert ran.exit_code == 1 and _lines(ran.output)[-1].startswith(
            f"fedrecon client: cannot reach the coordinator at {server.address} (TLS) within 2 s"), ran.output


@pytest.mark.parametrize("case", ["mismatched", "missing", "not pem", "cert alone"])
def test_bad_certificate_files_are_one_clear_line(pki: dict[str, Path], tmp_path: Path, case: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = pki["client_cert"], pki["client_key"]
    flags = {"mismatched": ["--tls-cert", str(cert), "--tls-key", str(pki["other_client_key"])],
             "missing": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key)],
             "not pem": ["--tls-cert", str(garbage), "--tls-key", str(key)],
             "cert alone": ["--tls-cert", str(cert)]}[case]
    expected = {"mismatched": "the key does not belong to the certificate",
                "missing": f"cannot read --tls-cert {tmp_path / 'nope.pem'}: No such file or directory",
                "not pem": "not a PEM certificate and an unencrypted PEM private key",
                "cert alone": "--tls-cert and --tls-key go together"}[case]
    ran = CliRunner().invoke(app, ["client", "--task", "cli", "--data", "synthetic", "--coordinator",
                                   f"127.0.0.1:{_free_port()}", "--tls-ca", str(pki["ca"]), *flags])
    assert ran.exit_code in (1, 2), ran.output
    (line,) = _lines(ran.output)
    assert line.startswith("fedrecon client: ") and expected in line, line


def test_nothing_accepted_exits_1(tmp_path: Path) -> None:
    """Every call refused (a coordinator that requires a token, none given): one line and exit 1. Clients
    that never get an assignment (the task has run all its rounds): the summary says so, and exit 1."""
    runner = CliRunner()
    (tmp_path / "token").mkdir()
    with _serve(tmp_path / "token", "--require-token") as server:
        ran = runner.invoke(app, ["client", "--task", "cli", "--data", "synthetic", "--users", "3",
                                  "--coordinator", server.address])
        assert ran.exit_code == 1, ran.output
        assert _lines(ran.output) == [
            f"connecting to {server.address} (plaintext)",
            f"fedrecon client: the coordinator at {server.address} refused: UNAUTHENTICATED: a valid client "
            "token is required"]
    # A retry window of at least 0.25 s keeps each client within its check-in budget (a burst of 10, then
    # one a second) for the whole --max-wait: a shorter one let a fast client be rate-limited (refused 1).
    with _serve(tmp_path, max_rounds=0, retry="[0.25, 0.5]") as server:
        ran = runner.invoke(app, ["client", "--task", "cli", "--data", "synthetic", "--users", "2",
                                  "--coordinator", server.address, "--max-wait", "1"])
        assert ran.exit_code == 1, ran.output
        assert _lines(ran.output)[-1] == "2 clients: accepted 0 (committed 0), refused 0, no assignment 2"


def test_retries_are_told_to_the_callback(tmp_path: Path) -> None:
    """A coordinator that goes away after the client connected: the library retries UNAVAILABLE within
    its budget and tells ``on_retry`` about each retry before giving up."""
    events: list[RetryEvent] = []
    data = load_dataset("synthetic", seed=42)
    with SqlStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        server = start_server(Coordinator(store, _task_spec()))
        client = FederatedClient(server.address, "cli", "u", data.train[sorted(data.train)[0]],
                                 retry=RetryPolicy(initial_s=0.05, max_s=0.2, give_up_after_s=2.0),
                                 on_retry=events.append)
        assert client.transport.latest_model("cli").model_version == 0
        server.stop()
        with pytest.raises(grpc.RpcError) as gone:
            client.transport.latest_model("cli")
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
    assert events and all(e.call == "GetLatestModel" and e.code == "UNAVAILABLE" for e in events)
    assert [e.attempt for e in events] == list(range(1, len(events) + 1))


class _Busy(grpc.aio.ServerInterceptor):
    """Answers the first ``times[method]`` calls of each method RESOURCE_EXHAUSTED with a retry hint, as
    a coordinator with no free slot does."""

    def __init__(self, times: dict[str, int], hint_ms: int) -> None:
        self.left = dict(times)
        self.hint_ms = hint_ms

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        method = str(details.method).rsplit("/", 1)[-1]
        if handler is None or self.left.get(method, 0) <= 0:
            return handler
        self.left[method] -= 1

        async def busy(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot",
                                retry_after_metadata(self.hint_ms))

        return grpc.unary_unary_rpc_method_handler(busy, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def test_the_command_prints_retries_as_they_happen(tmp_path: Path) -> None:
    """A busy coordinator (RESOURCE_EXHAUSTED with a retry hint): the command's own calls and each user's
    are retried after the hinted delay, each retry is one printed line, and the round still goes through."""
    busy = _Busy({"GetLatestModel": 2, "CheckIn": 1}, hint_ms=200)
    with SqlStore(f"sqlite:///{tmp_path / 'b.db'}") as store, \
            start_server(Coordinator(store, _task_spec()), interceptors=[busy]) as server:
        ran = CliRunner().invoke(app, ["client", "--task", "cli", "--data", "synthetic", "--users", "1",
                                       "--coordinator", server.address, "--max-wait", "60"])
    assert ran.exit_code == 0, ran.output
    retries = [line for line in _lines(ran.output) if ", retry " in line]
    assert [line.split(" in ")[0] for line in retries] == [
        "coordinator: GetLatestModel RESOURCE_EXHAUSTED, retry 1",
        "coordinator: GetLatestModel RESOURCE_EXHAUSTED, retry 2",
        f"user-{_first_user()}: CheckIn RESOURCE_EXHAUSTED, retry 1"], ran.output
    assert all(line.endswith("s (as the coordinator asked)") for line in retries)
    assert _lines(ran.output)[-1] == "1 clients: accepted 1 (committed 1 into version 1), refused 0"


def _first_user() -> int:
    return sorted(load_dataset("synthetic", seed=42).train)[0]
