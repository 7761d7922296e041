"""TLS from certificate files, and mutual TLS: a throwaway CA and certificates are made for each run."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrecon.client import FederatedClient, RetryPolicy, tls_credentials
from fedrecon.server.app import TlsFiles, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

NO_RETRY = RetryPolicy(initial_s=0.05, max_s=0.1, give_up_after_s=0.5, rpc_timeout_s=5)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None, *, ca: bool = False
                 ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("fedrecon test CA", ca_key, ca=True)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"fedrecon {who}", key, ca.subject, ca_key)
        files[f"{who}_cert"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}_key"] = _pem_key(key)
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(content)
    return paths


def _task() -> TaskSpec:
    return TaskSpec(name="tls", model={"kind": "matrix_factorization", "num_items": 600, "num_factors": 4},
                    rounds=RoundSettings(clients_per_round=1, min_reports=1, over_selection=1.0))


def test_tls_and_mutual_tls(pki: dict[str, Path], tmp_path: Path) -> None:
    data = load_dataset("synthetic", seed=42)
    user = sorted(data.train)[0]
    examples = data.train[user]
    ca = pki["ca"].read_bytes()
    with SqlStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        tls = TlsFiles(pki["server_cert"], pki["server_key"])
        with start_server(Coordinator(store, _task()), tls=tls) as server:
            secure = FederatedClient(server.address, "tls", "a", examples, tls=tls_credentials(ca))
            assert secure.participate().accepted
            plain = FederatedClient(server.address, "tls", "b", examples, retry=NO_RETRY)
            with pytest.raises(grpc.RpcError) as caught:
                plain.check_in()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS, no conversation

        mutual = TlsFiles(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
        with start_server(Coordinator(store, _task()), tls=mutual) as server:
            anonymous = FederatedClient(server.address, "tls", "c", examples, retry=NO_RETRY,
                                        tls=tls_credentials(ca))
            with pytest.raises(grpc.RpcError) as caught:
                anonymous.check_in()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused: no client cert
            known = FederatedClient(server.address, "tls", "d", examples, tls=tls_credentials(
                ca, cert_chain=pki["client_cert"].read_bytes(), private_key=pki["client_key"].read_bytes()))
            assert known.participate().accepted
            assert server.coordinator.version == 2
