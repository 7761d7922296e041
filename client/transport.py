"""The client side of the wire: typed calls to the coordinator, with retries for transient failures.

Each call is one RPC; a call that fails with UNAVAILABLE (coordinator restarting, connection refused, store
outage) or a transport-level DEADLINE_EXCEEDED is retried with exponential backoff and full jitter
(tenacity), so a fleet of devices does not hammer a coordinator that has just come back. When the coordinator
says how long to wait (trailing metadata ``retry-after-ms``, see ``fedrecon.protocol``) the wait is at least
that; RESOURCE_EXHAUSTED is retried only with such a hint (no free stream slot), never without one (a rate
limit). Refusals (INVALID_ARGUMENT, ABORTED, INTERNAL, ...) are not retried: they are answers. Every retry
is logged (logger ``fedrecon.client``) and passed to ``on_retry``, so a tool can show it.

The first call on a channel waits at most ``RetryPolicy.connect_timeout_s`` for a connection: a coordinator
that is down, or that speaks TLS to a plaintext client (or the reverse), is ``CoordinatorUnreachable`` in
seconds rather than after minutes of retries. Once connected, an outage is retried as above.

Every call returns the protocol's own types (``fedrecon.protocol``), never generated protobuf classes.
Traffic is counted in ``bytes_downloaded`` / ``bytes_uploaded`` (serialized message sizes).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING

import grpc
import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from fedrecon.core.compression import UploadCodec, encode_update
from fedrecon.protocol import (
    PROTOCOL_VERSION,
    Assignment,
    LatestModel,
    ReportOutcome,
    RetryLater,
    RoundOutcome,
    RoundState,
    retry_after_ms,
)
from fedrecon.tensors import DEFAULT_CHUNK_BYTES, chunks, decode_tensor_stream, manifest
from fedrecon.update_encoding import codec_from_wire, payload_arrays, tensor_encoding
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # secure aggregation needs the `secagg` extra (cryptography): imported when a round asks
    from fedrecon.secagg_wire import ClientMessage, Instruction, SecurePhase

log = logging.getLogger("fedrecon.client")
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: random delays growing from ``initial_s`` up to ``max_s`` each,
    giving up after ``give_up_after_s`` in total. ``connect_timeout_s`` bounds the wait for the channel's
    first connection (None: no bound, the retries alone decide)."""

    initial_s: float = 0.2
    max_s: float = 10.0
    give_up_after_s: float = 120.0
    rpc_timeout_s: float = 60.0
    connect_timeout_s: float | None = 10.0


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen: which call, after which failure, and how long the client waits."""

    call: str
    attempt: int  # the attempt that failed (1: the first)
    code: str  # the gRPC status name, e.g. UNAVAILABLE
    details: str
    delay_s: float
    hinted: bool  # the coordinator said how long to wait (retry-after-ms)


class CoordinatorUnreachable(grpc.RpcError):
    """No connection to the coordinator within the connect timeout. A ``grpc.RpcError`` with code
    UNAVAILABLE, so code that handles an unreachable coordinator that way keeps working."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def __str__(self) -> str:
        return self._message


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
    if not isinstance(err, grpc.RpcError) or isinstance(err, CoordinatorUnreachable):
        return False
    code = err.code()  # type: ignore[attr-defined]
    return code in TRANSIENT or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and _hint_s(err) is not None)


class _WaitWithHint:
    """Exponential backoff with full jitter, but never less than the server's hint (plus up to half of it
    again at random, so clients told the same delay do not come back at the same instant). Tells
    ``on_retry`` about each wait."""

    def __init__(self, policy: RetryPolicy, call: str, on_retry: Callable[[RetryEvent], None] | None) -> None:
        self._backoff = wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s)
        self._call = call
        self._on_retry = on_retry

    def __call__(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        err = state.outcome.exception() if state.outcome else None
        hint = _hint_s(err)
        delay = backoff if hint is None else max(backoff, hint * random.uniform(1.0, 1.5))
        code = err.code().name if isinstance(err, grpc.RpcError) else type(err).__name__  # type: ignore[attr-defined]
        details = (err.details() or "") if isinstance(err, grpc.RpcError) else str(err)  # type: ignore[attr-defined]
        event = RetryEvent(self._call, state.attempt_number, code, details, delay, hint is not None)
        log.info("%s failed (%s: %s); retry %d in %.1f s", event.call, event.code, event.details,
                 event.attempt, event.delay_s)
        if self._on_retry is not None:
            self._on_retry(event)
        return delay


def tls_credentials(ca: bytes, *, cert_chain: bytes | None = None, private_key: bytes | None = None
                    ) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca`` (PEM); with a certificate and key, for mutual TLS."""
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=private_key,
                                        certificate_chain=cert_chain)


class CoordinatorChannel:
    """Typed access to a coordinator over one gRPC channel (TLS when ``tls`` credentials are given).

    ``target`` may name several coordinators of one task (replicas: ``"host-a:50051,host-b:50051"``, or a
    sequence): calls go to one of them, and a call answered UNAVAILABLE (the coordinator is down, or it
    stands by while another leads) or DEADLINE_EXCEEDED (it is paused or cut off from its store, and holds
    calls without answering) is retried on the next one, round robin, with the usual backoff."""

    def __init__(self, target: str | Sequence[str] | None = None, *, channel: grpc.Channel | None = None,
                 retry: RetryPolicy | None = None, max_message_bytes: int = 4 * DEFAULT_CHUNK_BYTES,
                 token: str | None = None, tls: grpc.ChannelCredentials | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None) -> None:
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._credentials = tls
        if channel is None:
            if target is None:
                raise ValueError("give a target address or a channel")
            targets = [t.strip() for t in (target.split(",") if isinstance(target, str) else target)]
            if not targets or not all(targets):
                raise ValueError(f"no coordinator address in {target!r}")
            self.targets = targets
            channel = self._new_channel(targets[0])
        else:
            self.targets = [target] if isinstance(target, str) else ["the given channel"]
        self._current = 0
        self.tls = tls is not None
        self.channel = channel
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.bytes_downloaded = 0
        self.bytes_uploaded = 0
        self._connected = False
        self._connecting = threading.Lock()
        self._switching = threading.Lock()
        # The client token (``fedrecon token issue``), sent as call metadata on every RPC.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    @property
    def target(self) -> str:
        """The coordinator address calls go to now."""
        return self.targets[self._current]

    def _new_channel(self, target: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=self._options)
        return grpc.insecure_channel(target, options=self._options)

    def _switch(self, to: int) -> None:
        """Point calls at ``targets[to]`` (a new channel; the old one is closed)."""
        old = self.channel
        self._current = to
        self.channel = self._new_channel(self.targets[to])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        old.close()

    def _fail_over(self, state: RetryCallState) -> None:
        """Before a retry: an UNAVAILABLE or DEADLINE_EXCEEDED answer moves the next attempt to the next
        coordinator."""
        err = state.outcome.exception() if state.outcome else None
        if (len(self.targets) > 1 and isinstance(err, grpc.RpcError)
                and err.code() in TRANSIENT):  # type: ignore[attr-defined]
            with self._switching:
                self._switch((self._current + 1) % len(self.targets))
            log.info("coordinator unavailable; trying %s next", self.target)

    def close(self) -> None:
        self.channel.close()

    def connect(self) -> None:
        """Wait (at most ``connect_timeout_s`` per address) until a channel is connected, trying each
        coordinator address in turn; ``CoordinatorUnreachable`` if none is. Called by the first RPC; later
        outages are retried instead."""
        timeout = self.retry.connect_timeout_s
        with self._connecting:
            if self._connected or timeout is None:
                return
            for attempt in range(len(self.targets)):
                if attempt:
                    with self._switching:
                        self._switch((self._current + 1) % len(self.targets))
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=timeout)
                except grpc.FutureTimeoutError:
                    continue
                self._connected = True
                return
            how = "TLS" if self.tls else "plaintext"
            where = " or ".join(self.targets)
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {where} ({how}) within {timeout:g} s: is it running there, "
                f"and does it speak {how}?")

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Call ``fn`` with retries; a stub method is looked up again on every attempt, so a retry after
        a fail-over goes to the new coordinator (wrappers read ``self.stub`` when called)."""
        self.connect()
        p = self.retry
        name = getattr(fn, "_method", None) or getattr(fn, "__name__", "call")
        name = name.decode() if isinstance(name, bytes) else str(name)
        method = name.rsplit("/", 1)[-1]
        stub_method = hasattr(fn, "_method")
        for attempt in Retrying(retry=retry_if_exception(_transient),
                                wait=_WaitWithHint(p, method, self.on_retry),
                                before_sleep=self._fail_over,
                                stop=stop_after_delay(p.give_up_after_s), reraise=True):
            with attempt:
                call = getattr(self.stub, method) if stub_method else fn
                return call(*args, timeout=p.rpc_timeout_s, metadata=self._metadata, **kwargs)
        raise AssertionError("unreachable")

    # ----- calls ---------------------------------------------------------------------------------------
    def check_in(self, task: str, client_id: str, capabilities: Mapping[str, str] | None = None
                 ) -> Assignment | RetryLater:
        request = pb.CheckInRequest(task_name=task, client_id=client_id, protocol_version=PROTOCOL_VERSION,
                                    capabilities=dict(capabilities or {}))
        self.bytes_uploaded += request.ByteSize()
        response = self._call(self.stub.CheckIn, request)
        self.bytes_downloaded += response.ByteSize()
        if response.WhichOneof("outcome") == "assignment":
            a = response.assignment
            return Assignment(task_name=a.task_name, round_id=a.round_id, round_num=a.round_num,
                              model_version=a.model_version, token=a.assignment_token,
                              deadline=a.reporting_deadline.ToDatetime(tzinfo=UTC),
                              model_spec_json=a.model_spec_json, training_config_json=a.training_config_json,
                              batch_size=a.batch_size, max_chunk_bytes=a.max_chunk_bytes,
                              upload_codec=codec_from_wire(a.upload_codec).value,
                              secure_aggregation=a.secure_aggregation)
        w = response.retry
        lo = w.delay_min.ToNanoseconds() / 1e9
        return RetryLater(lo, max(lo, w.delay_max.ToNanoseconds() / 1e9), w.reason)

    def download(self, task: str, version: int, client_id: str = "") -> tuple[list[str], list[np.ndarray]]:
        request = pb.DownloadModelRequest(task_name=task, model_version=version, client_id=client_id)
        self.bytes_uploaded += request.ByteSize()

        def DownloadModel(timeout: float, metadata: object) -> tuple[list[str], list[np.ndarray]]:
            return decode_tensor_stream(self._counted(self.stub.DownloadModel(request, timeout=timeout,
                                                                              metadata=metadata)))

        return self._call(DownloadModel)

    def _counted(self, stream: Iterator[pb.TensorStreamMessage]) -> Iterator[pb.TensorStreamMessage]:
        for message in stream:
            self.bytes_downloaded += message.ByteSize()
            yield message

    def report(self, assignment: Assignment, client_id: str, names: Sequence[str],
               delta: Sequence[np.ndarray], weight: float, metrics: Mapping[str, float], *,
               rng: np.random.Generator | None = None) -> ReportOutcome:
        """Send one update, encoded as the assignment's ``upload_codec`` says (``rng`` draws the stochastic
        rounding of a quantising codec; default: fresh entropy); the coordinator's answer (refusals raise
        ``grpc.RpcError``)."""
        codec = UploadCodec(assignment.upload_codec)
        encodings: list[pb.TensorEncoding] = []
        payload: Sequence[np.ndarray] = delta
        if codec != UploadCodec.NONE:  # encoded once: a retried stream sends the very same bytes
            encoded = encode_update(delta, codec, rng if rng is not None else np.random.default_rng())
            encodings = [tensor_encoding(e) for e in encoded]
            payload = payload_arrays(encoded)
        header = pb.ReportHeader(task_name=assignment.task_name, client_id=client_id,
                                 round_id=assignment.round_id, assignment_token=assignment.token,
                                 weight=weight, metrics=dict(metrics), manifest=manifest(names, delta),
                                 encodings=encodings)

        def messages() -> Iterator[pb.ReportUpdateRequest]:
            first = pb.ReportUpdateRequest(header=header)
            self.bytes_uploaded += first.ByteSize()
            yield first
            for chunk in chunks(payload, assignment.max_chunk_bytes or DEFAULT_CHUNK_BYTES):
                message = pb.ReportUpdateRequest(chunk=chunk)
                self.bytes_uploaded += message.ByteSize()
                yield message

        # A fresh stream per attempt; the coordinator answers a repeated identical report idempotently.
        def ReportUpdate(timeout: float, metadata: object) -> pb.ReportUpdateResponse:
            return self.stub.ReportUpdate(messages(), timeout=timeout, metadata=metadata)

        response = self._call(ReportUpdate)
        return ReportOutcome(response.accepted, response.message, round_id=assignment.round_id,
                             round_num=assignment.round_num, model_version=assignment.model_version,
                             weight=float(weight), metrics=dict(metrics))

    def secure_aggregation(self, assignment: Assignment, client_id: str, message: ClientMessage | None
                           ) -> tuple[SecurePhase, Instruction]:
        """One step of a secure round: send ``message`` (None: a poll) and return the round's stage and what
        to do next (``client.secure_report`` drives the steps). A retried identical message is answered as
        the first was, so retrying a transient failure is safe."""
        from fedrecon.secagg_wire import SecurePhase, instruction_from, request_fields

        request = pb.SecureAggregationRequest(task_name=assignment.task_name, client_id=client_id,
                                              round_id=assignment.round_id, assignment_token=assignment.token,
                                              **request_fields(message))  # type: ignore[arg-type]
        self.bytes_uploaded += request.ByteSize()
        answer = self._call(self.stub.SecureAggregation, request)
        self.bytes_downloaded += answer.ByteSize()
        phases = {pb.SEC_AGG_PHASE_SELECTING: SecurePhase.SELECTING,
                  pb.SEC_AGG_PHASE_ADVERTISE: SecurePhase.ADVERTISE,
                  pb.SEC_AGG_PHASE_SHARE: SecurePhase.SHARE, pb.SEC_AGG_PHASE_MASK: SecurePhase.MASK,
                  pb.SEC_AGG_PHASE_UNMASK: SecurePhase.UNMASK, pb.SEC_AGG_PHASE_CLOSED: SecurePhase.CLOSED}
        return phases.get(answer.phase, SecurePhase.SELECTING), instruction_from(answer)

    def report_evaluation(self, task: str, client_id: str, version: int, squared_error: float,
                          num_correct: float, num_examples: float) -> None:
        request = pb.ReportEvaluationRequest(task_name=task, client_id=client_id, model_version=version,
                                             squared_error=squared_error, num_correct=num_correct,
                                             num_examples=num_examples)
        self.bytes_uploaded += request.ByteSize()
        self._call(self.stub.ReportEvaluation, request)

    def latest_model(self, task: str) -> LatestModel:
        r = self._call(self.stub.GetLatestModel, pb.GetLatestModelRequest(task_name=task))
        return LatestModel(r.model_version, r.model_spec_json, r.training_config_json, r.batch_size,
                           tuple(int(i) for i in r.item_ids))

    def round_outcome(self, task: str, round_id: int) -> RoundOutcome:
        """Where a round is: open, committed (into which version) or failed."""
        r = self._call(self.stub.GetRound, pb.GetRoundRequest(task_name=task, round_id=round_id))
        state = _ROUND_STATES.get(r.state)
        if state is None:
            raise ValueError(f"the coordinator answered round state {r.state}, unknown to this client")
        version = r.new_version if state == RoundState.COMMITTED else None
        return RoundOutcome(r.round_id, r.round_num, state, version, r.num_accepted, r.reason)


_ROUND_STATES = {pb.ROUND_STATE_OPEN: RoundState.OPEN, pb.ROUND_STATE_COMMITTED: RoundState.COMMITTED,
                 pb.ROUND_STATE_FAILED: RoundState.FAILED}
