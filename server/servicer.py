"""The gRPC face of the coordinator (grpc.aio): decode, call the coordinator, encode; errors become statuses.

Kept thin on purpose (as Flower does): every rule of the round lives in ``Coordinator``; here only what the
transport must own:

* Calls run on an event loop, so a stream that waits for its client holds no thread. The coordinator is
  thread-safe but blocking (a lock, store I/O): every call into it that may touch the store goes to a
  bounded thread pool (``run_in_executor``), never on the loop, so a slow store delays calls but never the
  loop itself. The report path is the exception that proves it: its header check and its fold are split
  by the coordinator into a part with no I/O (run on the loop: each trip to the pool and back costs two
  thread wake-ups and a wait on the coordinator's lock among the pool's threads, more than the work) and
  the rest (a commit, a round to look up in the store), which still goes to the pool.
* Capacity the streams cannot take from the unary calls: report streams, downloads and unary calls each have
  their own count (``ServerLimits``), and one caller group (a credential, a certificate, or a network peer
  in the trusted-network mode) holds at most a few streams. No free slot: RESOURCE_EXHAUSTED at once, with
  a retry hint.
* Time budgets on every stream: the first message of a report, each gap between its messages, the whole
  report, and the whole download (a client that stops reading). A spent budget ends the stream with
  RESOURCE_EXHAUSTED (no retry hint). Not DEADLINE_EXCEEDED: clients read that as their own call timing out
  and retry it, and a stalling client is not owed a retry; nor ABORTED, which tells a client its round is
  over.
* Requests are parsed here rather than by gRPC, so a message that is not protobuf is INVALID_ARGUMENT
  (grpc.aio would answer UNKNOWN), and every error maps to one documented status (``statuses``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from fedrecon.core.compression import UploadCodec
from fedrecon.protocol import Assignment, RetryLater, RoundState
from fedrecon.secagg_wire import SecAggWireError, client_message, response
from fedrecon.server.coordinator import Coordinator
from fedrecon.server.identity import Caller, Identifier
from fedrecon.server.limits import ServerLimits
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.slots import Slots
from fedrecon.server.statuses import CallStatus, StreamRefused, Unauthenticated, status_of
from fedrecon.tensors import (
    DEFAULT_CHUNK_BYTES,
    TensorDecodeError,
    check_layouts,
    chunk_view,
    layouts_from_manifest,
    tensor_stream,
)
from fedrecon.update_encoding import UPLOAD_CODECS, UpdateAssembler
from fedrecon.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
MIN_CHUNK_BYTES = 64 * 1024
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
T = TypeVar("T")
M = TypeVar("M", bound=Message)


class CoordinatorServicer:
    def __init__(self, coordinator: Coordinator, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 identifier: Identifier | None = None, limits: ServerLimits | None = None,
                 executor: Executor | None = None) -> None:
        """``executor`` runs the coordinator's calls (None: the event loop's default executor)."""
        self.coordinator = coordinator
        self.identifier = identifier or Identifier()
        self.max_chunk_bytes = max_chunk_bytes
        self.limits = limits or ServerLimits()
        self._executor = executor
        self._unary = Slots(self.limits.max_unary_calls)
        self._report_streams = Slots(self.limits.max_report_streams)
        self._download_streams = Slots(self.limits.max_downloads)
        self._per_credential = Slots(self.limits.max_streams_per_credential)
        self._per_peer = Slots(self.limits.max_streams_per_peer)
        # Every client of a round downloads the same version: encode it once, not once per client.
        self._downloads: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._downloads_lock = threading.Lock()
        # A round's first downloads arrive together, all missing the cache: one of them encodes the
        # version while the others wait for it, instead of each encoding its own copy.
        self._encoding_lock = threading.Lock()

    def streams_open(self) -> dict[str, int]:
        """Report streams and downloads holding a slot now (read from other threads for tests and figures:
        a racy snapshot, exact once the loop is quiet)."""
        return {"reports": self._report_streams.held(), "downloads": self._download_streams.held()}

    # ----- registration and the common wrapper ----------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers. Requests arrive as bytes and are parsed by ``_call`` (see the module
        docstring); responses are serialized by gRPC (downloads write pre-encoded bytes)."""
        def reply(message: Message) -> bytes:
            return message.SerializeToString()

        return grpc.method_handlers_generic_handler(SERVICE, {
            "CheckIn": grpc.unary_unary_rpc_method_handler(
                self._unary_call(self.CheckIn, pb.CheckInRequest), response_serializer=reply),
            "GetLatestModel": grpc.unary_unary_rpc_method_handler(
                self._unary_call(self.GetLatestModel, pb.GetLatestModelRequest), response_serializer=reply),
            "GetRound": grpc.unary_unary_rpc_method_handler(
                self._unary_call(self.GetRound, pb.GetRoundRequest), response_serializer=reply),
            "ReportEvaluation": grpc.unary_unary_rpc_method_handler(
                self._unary_call(self.ReportEvaluation, pb.ReportEvaluationRequest),
                response_serializer=reply),
            "SecureAggregation": grpc.unary_unary_rpc_method_handler(
                self._unary_call(self.SecureAggregation, pb.SecureAggregationRequest),
                response_serializer=reply),
            "DownloadModel": grpc.unary_stream_rpc_method_handler(self._download_call),
            "ReportUpdate": grpc.stream_unary_rpc_method_handler(self._report_call,
                                                                 response_serializer=reply),
        })

    async def _finish(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """``work``'s result, or the call ended with the status its error stands for."""
        try:
            return await work
        except Exception as err:  # every error becomes a documented status (statuses.status_of)
            status = status_of(err, retry_hint_ms=self.limits.retry_hint_ms)
        await context.abort(status.code, status.details, status.trailing)
        raise AssertionError("unreachable: abort raises")

    def _unary_call(self, method: Callable[[M, grpc.aio.ServicerContext], Awaitable[Message]],
                    request_type: type[M]) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
        async def behaviour(data: bytes, context: grpc.aio.ServicerContext) -> Message:
            async def work() -> Message:
                if not self._unary.take():
                    raise self._no_slot("calls in progress", self.limits.max_unary_calls)
                try:
                    return await method(_parse(request_type, data), context)
                finally:
                    self._unary.give_back()
            return await self._finish(context, work())
        return behaviour

    async def _report_call(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                           ) -> Message:
        """The stream is read with ``context.read()`` (``requests`` stays unused: one layer of async
        generators fewer per message)."""
        async def work() -> Message:
            async with self._stream_slot(self._report_streams, "report streams", context):
                return await self.ReportUpdate(context)
        return await self._finish(context, work())

    async def _download_call(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        async def work() -> None:
            async with self._stream_slot(self._download_streams, "downloads", context):
                await self.DownloadModel(_parse(pb.DownloadModelRequest, data), context)
        await self._finish(context, work())

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the coordinator's thread pool, never on the event loop (it may block on the store)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def _no_slot(self, what: str, capacity: int | None) -> StreamRefused:
        return StreamRefused(CallStatus.retry_later(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"the coordinator has no free slot ({capacity} {what}); "
            "retry after the hinted delay", self.limits.retry_hint_ms))

    @asynccontextmanager
    async def _stream_slot(self, pool: Slots, what: str, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[None]:
        """Hold one of ``pool``'s slots and one of the caller group's for the stream's lifetime."""
        if not pool.take():
            raise self._no_slot(what, pool.capacity)
        try:
            group, authenticated = self._group(context)  # before any message: the group needs no id
            per_group = self._per_credential if authenticated else self._per_peer
            if not per_group.take(group):
                raise self._no_slot("streams per caller", per_group.capacity)
            try:
                yield
            finally:
                per_group.give_back(group)
        finally:
            pool.give_back()

    def _credentials(self, context: grpc.aio.ServicerContext) -> tuple[str | None, bytes | None]:
        """The bearer token and client certificate the transport verified (read on the loop)."""
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        certs = context.auth_context().get("x509_pem_cert") or [] if self.identifier.client_certs else []
        return token, certs[0] if certs else None

    def _group(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """Whose stream limits apply, from the transport alone (no claimed id, no store read)."""
        token, cert = self._credentials(context)
        try:
            return self.identifier.group_of(token=token, client_cert_pem=cert, peer=context.peer())
        except ValueError as err:  # the transport proved no identity
            raise Unauthenticated(str(err)) from err

    async def _as_caller(self, context: grpc.aio.ServicerContext, claimed_id: str,
                         call: Callable[[Caller], T]) -> T:
        """``call(caller)`` for who is calling, derived from what the transport verified (see ``identity``).
        What the transport knows is read on the loop; the identity may need the store (a credential's
        devices), so it is derived on the pool, in the same trip as the call it is for (each trip to the
        pool and back costs a thread hand-over both ways)."""
        token, cert = self._credentials(context)
        peer = context.peer()

        def identified() -> T:
            try:
                caller = self.identifier.identify(claimed_id, token=token, client_cert_pem=cert, peer=peer)
            except ValueError as err:  # identify's word for "the transport proved no identity"
                raise Unauthenticated(str(err)) from err
            return call(caller)

        return await self._run(identified)

    def _known_caller(self, context: grpc.aio.ServicerContext, claimed_id: str) -> Caller | None:
        """Who is calling, from what the transport verified, when that needs no store query (read on the
        loop); None for a credential whose device count was never looked up (``_as_caller`` does that on
        the pool)."""
        token, cert = self._credentials(context)
        try:
            return self.identifier.identify_known(claimed_id, token=token, client_cert_pem=cert,
                                                  peer=context.peer())
        except ValueError as err:  # identify's word for "the transport proved no identity"
            raise Unauthenticated(str(err)) from err

    # ----- the calls -----------------------------------------------------------------------------------
    async def CheckIn(self, request: pb.CheckInRequest, context: grpc.aio.ServicerContext
                      ) -> pb.CheckInResponse:
        result = await self._check_in(request, context)
        if isinstance(result, Assignment):
            deadline = Timestamp()
            deadline.FromDatetime(result.deadline)
            return pb.CheckInResponse(assignment=pb.Assignment(
                task_name=result.task_name, round_id=result.round_id, round_num=result.round_num,
                model_version=result.model_version, assignment_token=result.token,
                reporting_deadline=deadline, model_spec_json=result.model_spec_json,
                training_config_json=result.training_config_json, batch_size=result.batch_size,
                max_chunk_bytes=self.max_chunk_bytes,
                upload_codec=UPLOAD_CODECS[UploadCodec(result.upload_codec)],
                secure_aggregation=result.secure_aggregation))
        lo, hi = Duration(), Duration()
        lo.FromNanoseconds(int(result.delay_min_s * 1e9))
        hi.FromNanoseconds(int(result.delay_max_s * 1e9))
        return pb.CheckInResponse(retry=pb.RetryWindow(delay_min=lo, delay_max=hi, reason=result.reason))

    async def _check_in(self, request: pb.CheckInRequest, context: grpc.aio.ServicerContext
                        ) -> Assignment | RetryLater:
        """The coordinator's answer to a check-in, decided on the loop when that needs no store (the caller
        known without a query, no round to open, no store write to wait for): most check-ins of a round.
        The rest go to the pool, as every check-in did before (about a third of a selected client's
        coordinator CPU was the two thread hand-overs)."""
        coordinator = self.coordinator
        caller = self._known_caller(context, request.client_id)
        if caller is None:  # a credential not seen yet: its device count is in the store
            return await self._as_caller(context, request.client_id, lambda caller: coordinator.check_in(
                request.task_name, caller, request.protocol_version))
        pending = coordinator.begin_check_in(request.task_name, caller, request.protocol_version)
        if pending.needs_io:
            return await self._run(coordinator.settle_check_in, pending)
        return coordinator.settle_check_in(pending)

    async def DownloadModel(self, request: pb.DownloadModelRequest, context: grpc.aio.ServicerContext
                            ) -> None:
        """Write the version's stream; a client that does not read it to the end within ``download_s``
        loses the call (its slot is what a client that stops reading would otherwise hold for ever)."""
        ends = asyncio.get_running_loop().time() + self.limits.download_s
        # A client may ask for smaller chunks, but not absurdly small ones (a message per byte).
        asked = request.max_chunk_bytes or self.max_chunk_bytes
        chunk = max(min(asked, self.max_chunk_bytes), min(MIN_CHUNK_BYTES, self.max_chunk_bytes))
        messages = self._cached_download(request.task_name, request.model_version, chunk)
        if messages is None:  # not encoded yet (or an older version, or an odd chunk size): on the pool
            messages = await self._run(self._download_messages, request.task_name, request.model_version,
                                       chunk)
        for message in messages:
            await _within(context.write(message), ends, f"the download was not read within "
                                                        f"{self.limits.download_s:g} s")

    async def ReportUpdate(self, context: grpc.aio.ServicerContext) -> pb.ReportUpdateResponse:
        """Read a report under its time budgets: the header, checked before any tensor bytes are read, then
        the chunks, assembled strictly; then the coordinator folds it."""
        limits, coordinator = self.limits, self.coordinator
        ends = asyncio.get_running_loop().time() + limits.report_s

        async def next_message(gap_s: float, what: str) -> bytes | None:
            data = await _within(context.read(), min(ends, asyncio.get_running_loop().time() + gap_s),
                                 f"{what} (report budget {limits.report_s:g} s)")
            return None if data is grpc.aio.EOF else data

        first = await next_message(limits.first_message_s, f"no report header within "
                                                           f"{limits.first_message_s:g} s")
        opening = None if first is None else _parse(pb.ReportUpdateRequest, first)
        if opening is None or opening.WhichOneof("kind") != "header":
            raise Refusal(Status.INVALID_ARGUMENT, "no_header", "a report stream must start with its header")
        header = opening.header
        try:
            caller, expected = await self._checked_header(context, header)
            layouts = layouts_from_manifest(header.manifest, max_bytes=sum(x.num_bytes for x in expected))
            check_layouts(layouts, expected)
            # Plain float32, or encoded (quantised / row-sparse) as the header's encodings say; strict.
            assembler = UpdateAssembler(layouts, header.encodings)
            gap = f"no message for {limits.chunk_gap_s:g} s"
            while (data := await next_message(limits.chunk_gap_s, gap)) is not None:
                # A chunk's tensor bytes stay where they arrived (a view, no copy); any message that is not
                # a plainly encoded chunk is parsed by protobuf, and refused if it is not a chunk.
                chunk = chunk_view(data)
                if chunk is None:
                    message = _parse(pb.ReportUpdateRequest, data)
                    if message.WhichOneof("kind") != "chunk":
                        raise TensorDecodeError("only tensor chunks may follow the header")
                    assembler.add(message.chunk)
                else:
                    assembler.add(chunk)
            delta = assembler.finish()
        except TensorDecodeError:
            coordinator.count_refusal("bad_tensors")  # a counter under the lock: no I/O
            raise
        # Checked and folded here on the loop (no I/O, about 0.25 ms of numpy for a MovieLens update); only
        # what needs the store (the commit of the round this report completes) goes to the pool.
        pending = coordinator.fold_report(header.task_name, caller, header.round_id, header.assignment_token,
                                          header.weight, dict(header.metrics), delta)
        outcome = (await self._run(coordinator.settle_report, pending) if pending.needs_io
                   else coordinator.settle_report(pending))
        return pb.ReportUpdateResponse(accepted=outcome.accepted, message=outcome.message)

    async def _checked_header(self, context: grpc.aio.ServicerContext, header: pb.ReportHeader
                              ) -> tuple[Caller, list[Any]]:
        """Who reports, and the layouts its update must have, once the coordinator has checked the header
        (before any tensor byte is read). Done on the loop when it needs no store (the caller's identity
        known without a query, the round in memory, no effect due); else on the pool as before."""
        caller = self._known_caller(context, header.client_id)
        if caller is None:  # a credential not seen yet: its device count is in the store
            return await self._as_caller(
                context, header.client_id, lambda caller: (caller, self._check_report(header, caller)))
        coordinator = self.coordinator
        pending = coordinator.begin_check(header.task_name, caller, header.round_id, header.assignment_token)
        if pending.needs_io:
            await self._run(coordinator.settle_check, pending)
        else:
            coordinator.settle_check(pending)
        return caller, coordinator.delta_layouts

    async def ReportEvaluation(self, request: pb.ReportEvaluationRequest, context: grpc.aio.ServicerContext
                               ) -> pb.ReportEvaluationResponse:
        await self._as_caller(context, request.client_id, lambda caller: self.coordinator.report_evaluation(
            request.task_name, caller, request.model_version, request.squared_error, request.num_correct,
            request.num_examples))
        return pb.ReportEvaluationResponse()

    async def GetLatestModel(self, request: pb.GetLatestModelRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetLatestModelResponse:
        return await self._run(self._latest_model, request.task_name)

    async def GetRound(self, request: pb.GetRoundRequest, context: grpc.aio.ServicerContext
                       ) -> pb.GetRoundResponse:
        """A round's state for a client that took part (did the update it had accepted get committed?).
        The caller must be who the transport requires (a token or a certificate), like every other call."""
        self._group(context)  # raises Unauthenticated when the transport proved no identity it needs
        outcome = await self._run(self.coordinator.round_outcome, request.task_name, request.round_id)
        return pb.GetRoundResponse(round_id=outcome.round_id, round_num=outcome.round_num,
                                   state=_ROUND_STATES[outcome.state], new_version=outcome.new_version or 0,
                                   num_accepted=outcome.num_accepted, reason=outcome.reason)

    async def SecureAggregation(self, request: pb.SecureAggregationRequest, context: grpc.aio.ServicerContext
                                ) -> pb.SecureAggregationResponse:
        """One step of a secure round (``server.secure_round``): decode the client's message strictly,
        let the coordinator take it, answer what the client must do next. The digest of the message
        recognises a retried identical message."""
        def step(caller: Caller) -> Any:
            try:
                message = client_message(request)
            except SecAggWireError as err:
                self.coordinator.count_refusal("secagg_bad_message")
                raise Refusal(Status.INVALID_ARGUMENT, "secagg_bad_message", str(err)) from err
            kind = request.WhichOneof("message")
            body = getattr(request, kind).SerializeToString(deterministic=True) if kind is not None else b""
            digest = hashlib.sha256(body).hexdigest() if kind is not None else ""
            return self.coordinator.secure_step(request.task_name, caller, request.round_id,
                                                request.assignment_token, message, digest)

        # Identified first (an unproven caller learns nothing of the message's checks), in one pool trip.
        phase, instruction = await self._as_caller(context, request.client_id, step)
        return response(phase, instruction)

    # ----- blocking helpers (run on the pool) ----------------------------------------------------------
    def _check_report(self, header: pb.ReportHeader, caller: Caller) -> list[Any]:
        self.coordinator.check_report(header.task_name, caller, header.round_id, header.assignment_token)
        return self.coordinator.delta_layouts

    def _latest_model(self, task_name: str) -> pb.GetLatestModelResponse:
        c = self.coordinator
        c.check_task(task_name)  # refuses an unknown task, echoing its name cut short
        return pb.GetLatestModelResponse(model_version=c.version, model_spec_json=c.model_spec_json,
                                         training_config_json=c.training_config_json,
                                         batch_size=c.task.batch_size, item_ids=c.task.item_ids or ())

    def _cached_download(self, task: str, version: int, chunk: int) -> list[bytes] | None:
        """The encoded stream of a version already encoded (checked on the loop: no store, no coordinator
        lock, so the round's downloads cost no trip to the pool); None if it must be made. Only committed
        versions are ever cached, and a committed version never changes."""
        self.coordinator.check_task(task)  # refuses an unknown task, echoing its name cut short
        with self._downloads_lock:
            return self._downloads.get((version, chunk))

    def _download_messages(self, task: str, version: int, chunk: int) -> list[bytes]:
        """The encoded stream of a version; only the server's own chunk size is cached, so no caller can
        fill the cache with odd encodings."""
        names, arrays = self.coordinator.model_arrays(task, version)  # refuses unknown tasks and versions
        if chunk != self.max_chunk_bytes:
            return _encoded(names, arrays, chunk)
        key = (version, chunk)
        with self._encoding_lock:
            with self._downloads_lock:
                if key in self._downloads:
                    self._downloads.move_to_end(key)
                    return self._downloads[key]
            messages = _encoded(names, arrays, chunk)
            with self._downloads_lock:
                self._downloads[key] = messages
                while len(self._downloads) > 2:  # the current version and perhaps the one before
                    self._downloads.popitem(last=False)
        return messages


_ROUND_STATES = {RoundState.OPEN: pb.ROUND_STATE_OPEN, RoundState.COMMITTED: pb.ROUND_STATE_COMMITTED,
                 RoundState.FAILED: pb.ROUND_STATE_FAILED}


def _encoded(names: list[str], arrays: list[Any], chunk: int) -> list[bytes]:
    """A version's download stream, serialized."""
    return [m.SerializeToString() for m in tensor_stream(names, arrays, chunk)]


def _parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError as err:
        raise Refusal(Status.INVALID_ARGUMENT, "malformed_message",
                      f"not a valid {message_type.DESCRIPTOR.name} message") from err


async def _within(step: Awaitable[T], deadline: float, what: str) -> T:
    """``step``'s result if it completes by ``deadline`` (event-loop time); else the stream is ended.

    ``asyncio.timeout_at`` awaits ``step`` in the calling task with one timer, where ``wait_for`` wraps
    it in a task of its own: this runs for every message of every stream."""
    try:
        async with asyncio.timeout_at(deadline):
            return await step
    except TimeoutError:
        raise StreamRefused(CallStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"stream ended by the coordinator: {what}")) from None

