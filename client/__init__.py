"""The embeddable client library: take part in FedRecon rounds and personalize on-device.

    from fedrecon.client import FederatedClient
    with FederatedClient("127.0.0.1:50051", "movielens", client_id, examples) as client:
        client.participate()                       # one round: check in, download, reconstruct, train, report
        top10 = client.personalize().recommend(10)  # reconstruct against the latest model, then predict

It needs the engine (``fedrecon.core``), grpcio and protobuf; it never imports the coordinator or its store.
"""

from fedrecon.client.model_file import ModelFile
from fedrecon.client.participant import FederatedClient, NoAssignment, RoundReport
from fedrecon.client.personalization import Personalization
from fedrecon.client.transport import CoordinatorChannel, RetryPolicy, tls_credentials

__all__ = ["CoordinatorChannel", "FederatedClient", "ModelFile", "NoAssignment", "Personalization",
           "RetryPolicy", "RoundReport", "tls_credentials"]
