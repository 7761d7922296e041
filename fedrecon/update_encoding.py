"""Compressed report deltas on the wire: ``TensorEncoding`` messages and their payloads, both ways.

The codecs themselves (quantisation, row selection) are ``fedrecon.core.compression``'s; this module only
turns an encoded tensor into the report header's ``TensorEncoding`` plus the bytes its chunks carry, and
back. A report whose header has no encodings is a plain float32 report (``fedrecon.tensors``), so a
client that predates compression keeps working. Decoding is strict: every announced count is checked
against the tensor's layout before a byte is read (no allocation beyond a small multiple of the dense
size), and every payload is checked by ``compression.decode``; any fault is a ``TensorDecodeError``
(INVALID_ARGUMENT) saying which tensor and what.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrecon.core.compression import (
    CodecError,
    EncodedTensor,
    UpdateTensor,
    UploadCodec,
    decode,
    encoded_size,
    scale_count,
)
from fedrecon.tensors import ChunkView, TensorAssembler, TensorDecodeError, TensorLayout
from fedrecon.v1 import coordinator_pb2 as pb

UPLOAD_CODECS: dict[UploadCodec, pb.UploadCodec] = {
    UploadCodec.NONE: pb.UPLOAD_CODEC_UNSPECIFIED,
    UploadCodec.Q16: pb.UPLOAD_CODEC_Q16,
    UploadCodec.Q8: pb.UPLOAD_CODEC_Q8,
    UploadCodec.ROWSPARSE: pb.UPLOAD_CODEC_ROW_SPARSE,
    UploadCodec.ROWSPARSE_Q16: pb.UPLOAD_CODEC_ROW_SPARSE_Q16,
    UploadCodec.ROWSPARSE_Q8: pb.UPLOAD_CODEC_ROW_SPARSE_Q8,
}
_CODECS_BY_WIRE = {v: k for k, v in UPLOAD_CODECS.items()}
_VALUE_DTYPES: dict[int, np.dtype] = {
    pb.VALUE_ENCODING_UNSPECIFIED: np.dtype("<f4"),
    pb.VALUE_ENCODING_INT16: np.dtype("<i2"),
    pb.VALUE_ENCODING_INT8: np.dtype("<i1"),
}
_WIRE_VALUES = {np.dtype(np.float32): pb.VALUE_ENCODING_UNSPECIFIED,
                np.dtype(np.int16): pb.VALUE_ENCODING_INT16, np.dtype(np.int8): pb.VALUE_ENCODING_INT8}


def codec_from_wire(value: int) -> UploadCodec:
    """The codec an assignment names; one this client does not know means plain float32 (always accepted)."""
    return _CODECS_BY_WIRE.get(value, UploadCodec.NONE)  # type: ignore[call-overload]


def tensor_encoding(encoded: EncodedTensor) -> pb.TensorEncoding:
    return pb.TensorEncoding(values=_WIRE_VALUES[np.dtype(encoded.values.dtype).newbyteorder("=")],
                             row_sparse=encoded.rows is not None,
                             num_rows=len(encoded.rows) if encoded.rows is not None else 0)


def payload_arrays(encoded: Sequence[EncodedTensor]) -> list[np.ndarray]:
    """Each tensor's payload as a byte array, for ``tensors.chunks``."""
    return [np.frombuffer(e.payload(), np.uint8) for e in encoded]


class UpdateAssembler:
    """Rebuilds a report's delta from its chunks: plain (no encodings) or encoded, strictly."""

    def __init__(self, layouts: Sequence[TensorLayout], encodings: Sequence[pb.TensorEncoding]) -> None:
        self.layouts = list(layouts)
        self.encodings = list(encodings)
        if not self.encodings:
            self._assembler = TensorAssembler(self.layouts)
            return
        if len(self.encodings) != len(self.layouts):
            raise TensorDecodeError(f"{len(self.encodings)} tensor encodings for {len(self.layouts)} "
                                    "tensors (give one per tensor, or none)")
        self._value_dtypes = [self._check(layout, e) for layout, e in zip(self.layouts, self.encodings,
                                                                           strict=True)]
        sizes = [encoded_size(layout.shape, dtype, e.num_rows if e.row_sparse else None)
                 for layout, dtype, e in zip(self.layouts, self._value_dtypes, self.encodings, strict=True)]
        self._assembler = TensorAssembler(self.layouts, payload_bytes=sizes)

    @staticmethod
    def _check(layout: TensorLayout, e: pb.TensorEncoding) -> np.dtype:
        name = layout.name
        if e.values not in _VALUE_DTYPES:
            raise TensorDecodeError(f"tensor {name!r}: unknown value encoding {e.values}")
        if layout.dtype != np.float32:
            raise TensorDecodeError(f"tensor {name!r}: only float32 tensors travel encoded")
        if e.row_sparse:
            if not layout.shape:
                raise TensorDecodeError(f"tensor {name!r}: a scalar cannot be sent row-sparse")
            if e.num_rows > layout.shape[0]:
                raise TensorDecodeError(f"tensor {name!r}: {e.num_rows} rows announced for a tensor of "
                                        f"{layout.shape[0]} rows")
        elif e.num_rows:
            raise TensorDecodeError(f"tensor {name!r}: num_rows is set but the tensor is not row-sparse")
        return _VALUE_DTYPES[e.values]

    def add(self, chunk: pb.TensorChunk | ChunkView) -> None:
        self._assembler.add(chunk)

    def finish(self) -> list[UpdateTensor]:
        if not self.encodings:
            return list(self._assembler.finish())
        out: list[UpdateTensor] = []
        for layout, e, dtype, raw in zip(self.layouts, self.encodings, self._value_dtypes,
                                         self._assembler.finish_payloads(), strict=True):
            try:
                out.append(decode(_parsed(layout, e, dtype, raw)))
            except CodecError as err:
                raise TensorDecodeError(f"tensor {layout.name!r}: {err}") from None
        return out


def _parsed(layout: TensorLayout, e: pb.TensorEncoding, dtype: np.dtype, raw: bytes | bytearray | memoryview
            ) -> EncodedTensor:
    """Split a payload (whose length the assembler already checked) into indices, scales and values."""
    shape = layout.shape
    view = memoryview(raw)
    at = 0
    rows = None
    n_rows = shape[0] if shape else 1
    if e.row_sparse:
        n_rows = int(e.num_rows)
        rows = np.frombuffer(view[at:at + 4 * n_rows], "<i4")
        at += 4 * n_rows
    scales = None
    if dtype != np.float32:
        count = scale_count(shape, n_rows)
        scales = np.frombuffer(view[at:at + 4 * count], "<f4").astype(np.float32, copy=False)
        at += 4 * count
    value_shape = (n_rows, *shape[1:]) if shape else ()
    values = np.frombuffer(view[at:], dtype).astype(dtype.newbyteorder("="), copy=False).reshape(value_shape)
    return EncodedTensor(shape, values, rows, scales)
