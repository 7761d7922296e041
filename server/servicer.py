"""The gRPC face of the coordinator: decode, call the coordinator, encode; refusals become gRPC statuses.

Kept thin on purpose (as Flower does): every rule lives in ``Coordinator``; here only the stream handling
(reading a report's header before its bytes, assembling chunks strictly) and the mapping of
``Refusal``/``TensorDecodeError`` to ``context.abort``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from fedrecon.server.coordinator import Assignment, Coordinator
from fedrecon.server.identity import Caller, Identifier
from fedrecon.server.refusals import Refusal
from fedrecon.server.store import StoreUnavailable
from fedrecon.tensors import (
    DEFAULT_CHUNK_BYTES,
    TensorAssembler,
    TensorDecodeError,
    check_layouts,
    layouts_from_manifest,
    tensor_stream,
)
from fedrecon.v1 import coordinator_pb2 as pb
from fedrecon.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MIN_CHUNK_BYTES = 64 * 1024


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    """End the call with the status ``err`` stands for; unexpected errors are logged, never echoed."""
    if isinstance(err, Refusal):
        context.abort(getattr(grpc.StatusCode, err.status.value), err.message)
    if isinstance(err, TensorDecodeError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, StoreUnavailable):
        context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator's store is unavailable; retry later")
    log.error("internal error while serving a call", exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator")


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 identifier: Identifier | None = None) -> None:
        self.coordinator = coordinator
        self.identifier = identifier or Identifier()
        self.max_chunk_bytes = max_chunk_bytes
        # Every client of a round downloads the same version: encode it once, not once per client.
        self._downloads: OrderedDict[tuple[int, int], list[pb.TensorStreamMessage]] = OrderedDict()
        self._downloads_lock = threading.Lock()

    def _download_messages(self, task: str, version: int, chunk: int) -> list[pb.TensorStreamMessage]:
        """The encoded stream of a version; only the server's own chunk size is cached, so no caller can
        fill the cache with odd encodings."""
        names, arrays = self.coordinator.model_arrays(task, version)  # refuses unknown tasks and versions
        key = (version, chunk)
        with self._downloads_lock:
            if key in self._downloads:
                self._downloads.move_to_end(key)
                return self._downloads[key]
        messages = list(tensor_stream(names, arrays, chunk))
        if chunk != self.max_chunk_bytes:
            return messages
        with self._downloads_lock:
            self._downloads[key] = messages
            while len(self._downloads) > 2:  # the current version and perhaps the one before
                self._downloads.popitem(last=False)
        return messages

    def _caller(self, context: grpc.ServicerContext, claimed_id: str) -> Caller:
        """Who is calling, from what the transport verified (see ``identity``)."""
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get("authorization", ""))
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        certs = context.auth_context().get("x509_pem_cert") or [] if self.identifier.client_certs else []
        return self.identifier.identify(claimed_id, token=token, client_cert_pem=certs[0] if certs else None,
                                        peer=context.peer())

    def CheckIn(self, request: pb.CheckInRequest, context: grpc.ServicerContext) -> pb.CheckInResponse:
        try:
            caller = self._caller(context, request.client_id)
            result = self.coordinator.check_in(request.task_name, caller, request.protocol_version,
                                               dict(request.capabilities))
        except Exception as err:  # every error becomes a status (see _abort)
            _abort(context, err)
        if isinstance(result, Assignment):
            deadline = Timestamp()
            deadline.FromDatetime(result.deadline)
            return pb.CheckInResponse(assignment=pb.Assignment(
                task_name=result.task_name, round_id=result.round_id, round_num=result.round_num,
                model_version=result.model_version, assignment_token=result.token,
                reporting_deadline=deadline, model_spec_json=result.model_spec_json,
                training_config_json=result.training_config_json, batch_size=result.batch_size,
                max_chunk_bytes=self.max_chunk_bytes))
        lo, hi = Duration(), Duration()
        lo.FromNanoseconds(int(result.delay_min_s * 1e9))
        hi.FromNanoseconds(int(result.delay_max_s * 1e9))
        return pb.CheckInResponse(retry=pb.RetryWindow(delay_min=lo, delay_max=hi, reason=result.reason))

    def DownloadModel(self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
                      ) -> Iterator[pb.TensorStreamMessage]:
        # A client may ask for smaller chunks, but not absurdly small ones (a message per byte).
        asked = request.max_chunk_bytes or self.max_chunk_bytes
        chunk = max(min(asked, self.max_chunk_bytes), min(MIN_CHUNK_BYTES, self.max_chunk_bytes))
        try:
            messages = self._download_messages(request.task_name, request.model_version, chunk)
        except Exception as err:  # every error becomes a status (see _abort)
            _abort(context, err)
        yield from messages

    def ReportUpdate(self, request_iterator: Iterator[pb.ReportUpdateRequest], context: grpc.ServicerContext
                     ) -> pb.ReportUpdateResponse:
        coordinator = self.coordinator
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a report stream must start with its header")
        header = first.header
        try:
            caller = self._caller(context, header.client_id)
            coordinator.check_report(header.task_name, caller, header.round_id,
                                     header.assignment_token)
            expected = coordinator.delta_layouts
            layouts = layouts_from_manifest(header.manifest, max_bytes=sum(x.num_bytes for x in expected))
            check_layouts(layouts, expected)
            assembler = TensorAssembler(layouts)
            for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise TensorDecodeError("only tensor chunks may follow the header")
                assembler.add(message.chunk)
            delta = assembler.finish()
            outcome = coordinator.report(header.task_name, caller, header.round_id,
                                         header.assignment_token, header.weight, dict(header.metrics), delta)
        except Exception as err:  # every error becomes a status (see _abort)
            if isinstance(err, TensorDecodeError):
                coordinator.count_refusal("bad_tensors")
            _abort(context, err)
        return pb.ReportUpdateResponse(accepted=outcome.accepted, message=outcome.message)

    def ReportEvaluation(self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
                         ) -> pb.ReportEvaluationResponse:
        try:
            caller = self._caller(context, request.client_id)
            self.coordinator.report_evaluation(request.task_name, caller, request.model_version,
                                               request.squared_error, request.num_correct,
                                               request.num_examples)
        except Exception as err:  # every error becomes a status (see _abort)
            _abort(context, err)
        return pb.ReportEvaluationResponse()

    def GetLatestModel(self, request: pb.GetLatestModelRequest, context: grpc.ServicerContext
                       ) -> pb.GetLatestModelResponse:
        c = self.coordinator
        try:
            c.check_task(request.task_name)  # refuses an unknown task, echoing its name cut short
        except Exception as err:  # every error becomes a status (see _abort)
            _abort(context, err)
        return pb.GetLatestModelResponse(model_version=c.version, model_spec_json=c.model_spec_json,
                                         training_config_json=c.training_config_json,
                                         batch_size=c.task.batch_size)
