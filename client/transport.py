"""The client side of the wire: typed calls to the coordinator, with retries for transient failures.

Each call is one RPC; a call that fails with UNAVAILABLE (coordinator restarting, connection refused, store
outage) or a transport-level DEADLINE_EXCEEDED is retried with exponential backoff and full jitter
(tenacity), so a fleet of devices does not hammer a coordinator that has just come back. When the coordinator
says how long to wait (trailing metadata ``retry-after-ms``, see ``fedrecon.retry_hint``) the wait is at least
that; RESOURCE_EXHAUSTED is retried only with such a hint (no free stream slot), never without one (a rate
limit). Refusals (INVALID_ARGUMENT, ABORTED, INTERNAL, ...) are not retried: they are answers.

Traffic is counted in ``bytes_downloaded`` / ``bytes_uploaded`` (serialized message sizes).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from fedrecon.retry_hint import retry_after_ms
from fedrecon.tensors import DEFAULT_CHUNK_BYTES, chunks, decode_tensor_stream, manifest
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

PROTOCOL_VERSION = 1
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: random delays growing from ``initial_s`` up to ``max_s`` each,
    giving up after ``give_up_after_s`` in total."""

    initial_s: float = 0.2
    max_s: float = 10.0
    give_up_after_s: float = 120.0
    rpc_timeout_s: float = 60.0


def _hint_s(err: BaseException | None) -> float | None:
    """The coordinator's retry hint carried by ``err``, in seconds, if any."""
    trailing = getattr(err, "trailing_metadata", None)
    if not isinstance(err, grpc.RpcError) or trailing is None:
        return None
    try:
        ms = retry_after_ms(trailing())
    except Exception:  # a call object without metadata (a test double, a local failure)
        return None
    return None if ms is None else ms / 1000.0


def _transient(err: BaseException) -> bool:
    if not isinstance(err, grpc.RpcError):
        return False
    code = err.code()  # type: ignore[attr-defined]
    return code in TRANSIENT or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and _hint_s(err) is not None)


class _WaitWithHint:
    """Exponential backoff with full jitter, but never less than the server's hint (plus up to half of it
    again at random, so clients told the same delay do not come back at the same instant)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s)

    def __call__(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        hint = _hint_s(state.outcome.exception() if state.outcome else None)
        return backoff if hint is None else max(backoff, hint * random.uniform(1.0, 1.5))


def tls_credentials(ca: bytes, *, cert_chain: bytes | None = None, private_key: bytes | None = None
                    ) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca`` (PEM); with a certificate and key, for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=private_key,
                                        certificate_chain=cert_chain)


class CoordinatorChannel:
    """Typed access to one coordinator over one gRPC channel (TLS when ``tls`` credentials are given)."""

    def __init__(self, target: str | None = None, *, channel: grpc.Channel | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int = 4 * DEFAULT_CHUNK_BYTES,
                 token: str | None = None, tls: grpc.ChannelCredentials | None = None) -> None:
        if channel is None:
            if target is None:
                raise ValueError("give a target address or a channel")
            options = [("grpc.max_receive_message_length", max_message_bytes),
                       ("grpc.max_send_message_length", max_message_bytes)]
            channel = (grpc.secure_channel(target, tls, options=options) if tls is not None
                       else grpc.insecure_channel(target, options=options))
        self.channel = channel
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.retry = retry or RetryPolicy()
        self.bytes_downloaded = 0
        self.bytes_uploaded = 0
        # The client token (``fedrecon token issue``), sent as call metadata on every RPC.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        p = self.retry
        for attempt in Retrying(retry=retry_if_exception(_transient), wait=_WaitWithHint(p),
                                stop=stop_after_delay(p.give_up_after_s), reraise=True):
            with attempt:
                return fn(*args, timeout=p.rpc_timeout_s, metadata=self._metadata, **kwargs)
        raise AssertionError("unreachable")

    # ----- calls ---------------------------------------------------------------------------------------
    def check_in(self, task: str, client_id: str, capabilities: Mapping[str, str] | None = None
                 ) -> pb.CheckInResponse:
        request = pb.CheckInRequest(task_name=task, client_id=client_id, protocol_version=PROTOCOL_VERSION,
                                    capabilities=dict(capabilities or {}))
        self.bytes_uploaded += request.ByteSize()
        response = self._call(self.stub.CheckIn, request)
        self.bytes_downloaded += response.ByteSize()
        return response

    def download(self, task: str, version: int, client_id: str = "") -> tuple[list[str], list[np.ndarray]]:
        request = pb.DownloadModelRequest(task_name=task, model_version=version, client_id=client_id)
        self.bytes_uploaded += request.ByteSize()

        def fetch(timeout: float, metadata: object) -> tuple[list[str], list[np.ndarray]]:
            return decode_tensor_stream(self._counted(self.stub.DownloadModel(request, timeout=timeout,
                                                                              metadata=metadata)))

        return self._call(fetch)

    def _counted(self, stream: Iterator[pb.TensorStreamMessage]) -> Iterator[pb.TensorStreamMessage]:
        for message in stream:
            self.bytes_downloaded += message.ByteSize()
            yield message

    def report(self, assignment: pb.Assignment, client_id: str, names: Sequence[str],
               delta: Sequence[np.ndarray], weight: float, metrics: Mapping[str, float]
               ) -> pb.ReportUpdateResponse:
        header = pb.ReportHeader(task_name=assignment.task_name, client_id=client_id,
                                 round_id=assignment.round_id, assignment_token=assignment.assignment_token,
                                 weight=weight, metrics=dict(metrics), manifest=manifest(names, delta))

        def messages() -> Iterator[pb.ReportUpdateRequest]:
            first = pb.ReportUpdateRequest(header=header)
            self.bytes_uploaded += first.ByteSize()
            yield first
            for chunk in chunks(delta, assignment.max_chunk_bytes or DEFAULT_CHUNK_BYTES):
                message = pb.ReportUpdateRequest(chunk=chunk)
                self.bytes_uploaded += message.ByteSize()
                yield message

        # A fresh stream per attempt; the coordinator answers a repeated identical report idempotently.
        return self._call(lambda timeout, metadata: self.stub.ReportUpdate(messages(), timeout=timeout,
                                                                           metadata=metadata))

    def report_evaluation(self, task: str, client_id: str, version: int, squared_error: float,
                          num_correct: float, num_examples: float) -> None:
        request = pb.ReportEvaluationRequest(task_name=task, client_id=client_id, model_version=version,
                                             squared_error=squared_error, num_correct=num_correct,
                                             num_examples=num_examples)
        self.bytes_uploaded += request.ByteSize()
        self._call(self.stub.ReportEvaluation, request)

    def latest_model(self, task: str) -> pb.GetLatestModelResponse:
        return self._call(self.stub.GetLatestModel, pb.GetLatestModelRequest(task_name=task))
