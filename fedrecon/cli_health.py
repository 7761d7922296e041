"""``fedrecon health``: ask a coordinator's standard gRPC health service whether it is SERVING.

Container health checks and Kubernetes ``exec`` probes need a command that speaks gRPC health checking
(``grpc.health.v1.Health/Check``); Kubernetes' own ``grpc`` probes speak it too, but only in plaintext. This
one also speaks TLS (``--tls-ca``), so the image needs no separate probe binary: the exit status is the
answer, 0 only for SERVING, 1 for anything else (NOT_SERVING, an unknown service, no answer in time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_ADDRESS = "127.0.0.1:50051"


def health(
    address: Annotated[str, typer.Option(help="HOST:PORT of the coordinator")] = DEFAULT_ADDRESS,
    service: Annotated[str, typer.Option(
        help='the service to ask about: "" (the default) is the whole server, as probes ask')] = "",
    timeout_s: Annotated[float, typer.Option(min=0.001, help="give up (exit 1) after this")] = 5.0,
    tls_ca: Annotated[Path | None, typer.Option(
        help="PEM CA that signed the coordinator's certificate: connect over TLS")] = None,
    tls_server_name: Annotated[str | None, typer.Option(
        help="the name the certificate must carry, when it is not the host of --address (a probe on "
             "127.0.0.1 of a certificate for the Service's DNS name)")] = None,
) -> None:
    """Exit 0 if the coordinator at ADDRESS answers SERVING, else 1, printing the status on stdout.

    For container health checks and probes: no client token is needed (the health service takes none)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        except OSError as err:
            typer.secho(f"cannot read --tls-ca {tls_ca}: {err.strerror or err}", err=True, fg="red")
            raise typer.Exit(2) from err
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=False)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            detail = err.details() if isinstance(err, grpc.Call) else str(err)
            what = (f"no service {service!r}" if code == grpc.StatusCode.NOT_FOUND
                    else f"{code.name if code else 'error'}: {' '.join(str(detail).split())}")
            typer.echo(f"{address}: {what}")
            raise typer.Exit(1) from err
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(f"{address}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)
