"""``fedrecon health`` (the container's HEALTHCHECK and the Kubernetes exec probe) against a real gRPC server
on loopback that registers the standard health service (``grpc_health``'s HealthServicer): exit 0 only for
SERVING, in plaintext and over TLS."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner, Result

from fedrecon.cli import app

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _server(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, health.HealthServicer,
                                                                         int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, servicer, port


@pytest.fixture
def plain() -> Iterator[tuple[health.HealthServicer, int]]:
    server, servicer, port = _server()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def _health(*args: str) -> Result:
    return CliRunner().invoke(app, ["health", *args])


def test_serving_exits_0_and_anything_else_1(plain: tuple[health.HealthServicer, int]) -> None:
    servicer, port = plain
    address = f"127.0.0.1:{port}"
    servicer.set("", SERVING)
    ok = _health("--address", address, "--timeout-s", "30")
    assert ok.exit_code == 0 and ok.stdout.strip() == f"{address}: SERVING", ok.output
    servicer.set("", NOT_SERVING)
    down = _health("--address", address, "--timeout-s", "30")
    assert down.exit_code == 1 and down.stdout.strip() == f"{address}: NOT_SERVING", down.output
    servicer.set("fedrecon.v1.Coordinator", SERVING)
    named = _health("--address", address, "--service", "fedrecon.v1.Coordinator", "--timeout-s", "30")
    assert named.exit_code == 0, named.output
    unknown = _health("--address", address, "--service", "nothing.Here", "--timeout-s", "30")
    assert unknown.exit_code == 1 and "no service 'nothing.Here'" in unknown.stdout, unknown.output


def test_nobody_listening_exits_1() -> None:
    server, _, closed = _server()
    server.stop(None)  # a port that was just served and is not any more
    result = _health("--address", f"127.0.0.1:{closed}", "--timeout-s", "10")
    assert result.exit_code == 1 and "UNAVAILABLE" in result.stdout, result.output


def test_over_tls_with_the_ca(pki: dict[str, Path]) -> None:
    credentials = grpc.ssl_server_credentials([(pki["server_key"].read_bytes(),
                                                pki["server_cert"].read_bytes())])
    server, servicer, port = _server(credentials)
    try:
        servicer.set("", SERVING)
        address = f"127.0.0.1:{port}"
        ok = _health("--address", address, "--tls-ca", str(pki["ca"]), "--timeout-s", "30")
        assert ok.exit_code == 0 and "SERVING" in ok.stdout, ok.output
        named = _health("--address", address, "--tls-ca", str(pki["ca"]), "--tls-server-name", "localhost",
                        "--timeout-s", "30")
        assert named.exit_code == 0, named.output
        plaintext = _health("--address", address, "--timeout-s", "10")
        assert plaintext.exit_code == 1, plaintext.output
    finally:
        server.stop(None)
