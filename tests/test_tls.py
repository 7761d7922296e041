"""TLS from certificate files, and mutual TLS: a throwaway CA and certificates are made for each run
(the ``pki`` fixture in conftest)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedrecon.client import FederatedClient, RetryPolicy, tls_credentials
from fedrecon.server.app import TlsFiles, start_server
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.store import SqlStore
from fedrecon.server.task import RoundSettings, TaskSpec
from fedrecon.simulations.ratings import load_dataset

NO_RETRY = RetryPolicy(initial_s=0.05, max_s=0.1, give_up_after_s=0.5, rpc_timeout_s=5)


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
