"""The embeddable client library: take part in FedRecon rounds and personalize on-device.

    from fedrecon.client import FederatedClient
    with FederatedClient("127.0.0.1:50051", "movielens", client_id, examples) as client:
        report = client.participate()               # one round: check in, train on-device, report
        top10 = client.personalize().recommend(10)  # [(item id, predicted rating), ...], best first

It needs the engine (``fedrecon.core``), grpcio and protobuf; it never imports the coordinator or its store.
TensorFlow is imported when a client step first runs, not by ``import fedrecon.client``. Every call returns
the protocol's own types (``fedrecon.protocol``: ``Assignment``, ``ReportOutcome``, ``RoundOutcome``, ...),
never generated protobuf classes.
"""

from fedrecon.client.model_file import ModelFile
from fedrecon.client.participant import FederatedClient, NoAssignment
from fedrecon.client.personalization import Personalization
from fedrecon.client.transport import (
    CoordinatorChannel,
    CoordinatorUnreachable,
    RetryEvent,
    RetryPolicy,
    tls_credentials,
)
from fedrecon.client.vocabulary import ItemVocabulary
from fedrecon.core.batching import ClientExamples
from fedrecon.protocol import PROTOCOL_VERSION, Assignment, ReportOutcome, RoundOutcome, RoundState

__all__ = ["PROTOCOL_VERSION", "Assignment", "ClientExamples", "CoordinatorChannel", "CoordinatorUnreachable",
           "FederatedClient", "ItemVocabulary", "ModelFile", "NoAssignment", "Personalization",
           "ReportOutcome", "RetryEvent", "RetryPolicy", "RoundOutcome", "RoundState", "tls_credentials"]
