"""Tensors on the wire and at rest: the one place where arrays become bytes and back.

On the wire a list of named tensors travels as a ``TensorManifest`` (name, dtype, shape of each) followed by
``TensorChunk`` messages holding the raw little-endian bytes in order, at most ``chunk_bytes`` each, so a
model larger than gRPC's message limit streams fine. Decoding is strict: ``TensorAssembler`` checks the
manifest against what the receiver expects (names, dtypes, shapes) and every chunk against the manifest
(index, offset, length), and says exactly what was wrong; nothing reaches the caller until every byte of
every tensor has arrived.

At rest (the store, exported model files) tensors are an ``.npz`` archive written without pickle.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrecon.v1 import coordinator_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
MAX_TENSOR_BYTES = 1 << 32  # no manifest may announce more than 4 GiB, whatever the caller's own limit
MAX_DIMS = 32  # numpy holds at most 64; no model here needs more than a handful
MAX_DIM = 1 << 31

_TO_NUMPY: dict[pb.DType, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}


class TensorDecodeError(ValueError):
    """A tensor message that does not match its manifest or what the receiver expects."""


@dataclass(frozen=True)
class TensorLayout:
    """Name, numpy dtype and shape of one expected tensor."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: no silent int64 wrap-around


def wire_dtype(dtype: np.dtype[Any]) -> pb.DType:
    try:
        return _FROM_NUMPY[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise TensorDecodeError(f"dtype {dtype} cannot travel (float32, float64, int32, int64)") from None


def manifest(names: Sequence[str], arrays: Sequence[np.ndarray]) -> pb.TensorManifest:
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} arrays")
    return pb.TensorManifest(tensors=[
        pb.TensorSpec(name=n, dtype=wire_dtype(np.asarray(a).dtype), shape=list(np.shape(a)))
        for n, a in zip(names, arrays, strict=True)])


def chunks(arrays: Sequence[np.ndarray], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Raw bytes of each array in order, split at ``chunk_bytes``; an empty tensor sends no chunk."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    for index, array in enumerate(arrays):
        little = np.asarray(array).dtype.newbyteorder("<")
        raw = memoryview(np.ascontiguousarray(array, dtype=little).tobytes())
        for offset in range(0, len(raw), chunk_bytes):
            piece = bytes(raw[offset:offset + chunk_bytes])
            yield pb.TensorChunk(tensor_index=index, offset=offset, data=piece)


def tensor_stream(names: Sequence[str], arrays: Sequence[np.ndarray], chunk_bytes: int = DEFAULT_CHUNK_BYTES
                  ) -> Iterator[pb.TensorStreamMessage]:
    """A manifest message, then the chunk messages: what ``DownloadModel`` streams."""
    yield pb.TensorStreamMessage(manifest=manifest(names, arrays))
    for chunk in chunks(arrays, chunk_bytes):
        yield pb.TensorStreamMessage(chunk=chunk)


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A ``TensorChunk`` read straight from the bytes of the message that carried it: ``data`` is a view of
    those bytes, not a copy (``chunk_view``)."""

    tensor_index: int
    offset: int
    data: memoryview


#: Field number of the ``TensorChunk`` in ``ReportUpdateRequest`` and in ``TensorStreamMessage`` alike.
CHUNK_FIELD = 2


def chunk_view(message: bytes) -> ChunkView | None:
    """The chunk of a serialized ``ReportUpdateRequest`` or ``TensorStreamMessage`` that holds one, read
    without copying its data; None for any other message.

    Parsing such a message with protobuf copies the tensor bytes twice (into the parsed message, then out
    of it when ``data`` is read); this reads the few bytes of framing around them instead. Only the
    encoding protobuf itself writes is read here (each field at most once, in field order, no other
    field, lengths that end exactly where the message does); for any other (valid or not) it returns None
    and the caller parses the message with protobuf, so what is accepted, and what it means, is exactly
    what protobuf says."""
    end = len(message)
    if end < 2 or message[0] != (CHUNK_FIELD << 3 | 2):
        return None
    inner = _varint(message, 1, end)
    if inner is None or inner[1] + inner[0] != end:
        return None
    at = inner[1]
    index = offset = 0
    data_start = data_end = at
    if at < end and message[at] == 0x08:  # tensor_index (uint32)
        field = _varint(message, at + 1, end)
        if field is None or field[0] >= 1 << 32:
            return None
        index, at = field
    if at < end and message[at] == 0x10:  # offset (uint64)
        field = _varint(message, at + 1, end)
        if field is None:
            return None
        offset, at = field
    if at < end and message[at] == 0x1A:  # data (bytes)
        field = _varint(message, at + 1, end)
        if field is None or field[1] + field[0] != end:
            return None
        data_start, data_end = field[1], end
        at = end
    if at != end:
        return None
    return ChunkView(index, offset, memoryview(message)[data_start:data_end])


def _varint(buf: bytes, at: int, end: int) -> tuple[int, int] | None:
    """(value, position after it) of the base-128 varint at ``at``; None if it runs past ``end``, is
    longer than 10 bytes or does not fit 64 bits."""
    value = shift = 0
    for position in range(at, min(at + 10, end)):
        byte = buf[position]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, position + 1) if value < 1 << 64 else None
        shift += 7
    return None


def layouts_from_manifest(m: pb.TensorManifest, *, max_bytes: int | None = None) -> list[TensorLayout]:
    """The manifest as layouts; refuses unknown dtypes, impossible shapes and totals above ``max_bytes``
    (and above ``MAX_TENSOR_BYTES`` in any case, so a hostile peer cannot make the receiver allocate)."""
    layouts = []
    total = 0
    limit = MAX_TENSOR_BYTES if max_bytes is None else min(max_bytes, MAX_TENSOR_BYTES)
    for spec in m.tensors:
        if spec.dtype not in _TO_NUMPY:
            raise TensorDecodeError(f"tensor {spec.name!r}: unknown dtype {spec.dtype}")
        if len(spec.shape) > MAX_DIMS or any(not 0 <= d < MAX_DIM for d in spec.shape):
            shown = list(spec.shape)[:MAX_DIMS + 1]
            raise TensorDecodeError(f"tensor {spec.name!r}: impossible shape {shown} "
                                    f"(at most {MAX_DIMS} dimensions, each 0 to {MAX_DIM - 1})")
        layout = TensorLayout(spec.name, _TO_NUMPY[spec.dtype], tuple(int(d) for d in spec.shape))
        total += layout.num_bytes
        if total > limit:
            raise TensorDecodeError(f"tensors add up to more than the {limit}-byte limit")
        layouts.append(layout)
    return layouts


def check_layouts(received: Sequence[TensorLayout], expected: Sequence[TensorLayout]) -> None:
    """Raise unless ``received`` names exactly the ``expected`` tensors, in order, dtypes and shapes."""
    got = [r.name for r in received]
    want = [e.name for e in expected]
    if got != want:
        unknown = sorted(set(got) - set(want))
        detail = f"; unknown: {unknown}" if unknown else ""
        raise TensorDecodeError(f"expected tensors {want}, got {got}{detail}")
    for r, e in zip(received, expected, strict=True):
        if r.dtype != e.dtype:
            raise TensorDecodeError(f"tensor {r.name!r}: dtype {r.dtype} where {e.dtype} is expected")
        if r.shape != e.shape:
            raise TensorDecodeError(f"tensor {r.name!r}: shape {list(r.shape)} where {list(e.shape)} "
                                    "is expected")


class TensorAssembler:
    """Rebuilds the tensors of one manifest from its chunks, refusing anything out of place.

    A tensor that arrives in one chunk (the usual case: chunks are up to a MiB) keeps that chunk's bytes
    as they are, with no copy: a ``ChunkView``'s are the received message's own, when they are 8-byte
    aligned (the first tensor of a message between 16 KiB and 2 MiB is, in protobuf's framing; another is
    copied once, aligned). Only a tensor split over several chunks is copied into a buffer of its own,
    allocated when its first chunk arrives."""

    def __init__(self, layouts: Sequence[TensorLayout], *,
                 payload_bytes: Sequence[int] | None = None) -> None:
        """``payload_bytes``: what each tensor's chunks carry when it travels encoded (default: its plain
        bytes); such a stream is read with ``finish_payloads``."""
        self.layouts = list(layouts)
        self._sizes = ([layout.num_bytes for layout in self.layouts] if payload_bytes is None
                       else list(payload_bytes))
        if len(self._sizes) != len(self.layouts):
            raise ValueError(f"{len(self._sizes)} payload sizes for {len(self.layouts)} tensors")
        self._buffers: list[bytes | bytearray | memoryview] = [b""] * len(self.layouts)
        self._filled = [0] * len(self.layouts)
        self._current = 0

    def add(self, chunk: pb.TensorChunk | ChunkView) -> None:
        """Take the next chunk; a ``ChunkView`` that holds a whole tensor is kept as the view it is."""
        i = chunk.tensor_index
        if i >= len(self.layouts):
            raise TensorDecodeError(f"chunk for tensor {i}, but the manifest has {len(self.layouts)}")
        # Skip past tensors already complete (including empty ones) to find the one being filled.
        while self._current < len(self.layouts) and self._filled[self._current] == self._sizes[self._current]:
            self._current += 1
        if i != self._current:
            raise TensorDecodeError(f"chunk for tensor {i} while tensor {self._current} is incomplete "
                                    "or already received (chunks must arrive in order)")
        if chunk.offset != self._filled[i]:
            raise TensorDecodeError(f"tensor {self.layouts[i].name!r}: chunk at offset {chunk.offset}, "
                                    f"expected {self._filled[i]}")
        data = chunk.data  # read once: every read of a protobuf bytes field is a copy
        start, size = self._filled[i], self._sizes[i]
        end = start + len(data)
        if not data or end > size:
            raise TensorDecodeError(f"tensor {self.layouts[i].name!r}: chunk of {len(data)} bytes at "
                                    f"offset {chunk.offset} does not fit its {size} bytes")
        if start == 0 and end == size:
            # The whole tensor in one chunk: kept as it came, unless a view into the message is not
            # 8-byte aligned, where numpy would copy it (twice, for a dot product) at every use.
            aligned = not isinstance(data, memoryview) or np.frombuffer(data, np.uint8).ctypes.data % 8 == 0
            self._buffers[i] = data if aligned else bytes(data)
        else:
            if start == 0:
                self._buffers[i] = bytearray(size)
            buffer = self._buffers[i]
            assert isinstance(buffer, bytearray)  # a split tensor's first chunk made it
            buffer[start:end] = data
        self._filled[i] = end

    def finish_payloads(self) -> list[bytes | bytearray | memoryview]:
        """Each tensor's bytes as they arrived, once every byte has (read-only use: a buffer may be the
        chunk's own bytes)."""
        for layout, size, filled in zip(self.layouts, self._sizes, self._filled, strict=True):
            if filled != size:
                raise TensorDecodeError(f"tensor {layout.name!r}: stream ended after {filled} of "
                                        f"{size} bytes")
        return self._buffers

    def finish(self) -> list[np.ndarray]:
        self.finish_payloads()
        arrays = []
        for layout, buf in zip(self.layouts, self._buffers, strict=True):
            # Shares the assembled buffer (no copy), read-only so that no reader can alter what others see.
            array = np.frombuffer(buf, dtype=layout.dtype).reshape(layout.shape)
            array = array.astype(layout.dtype.newbyteorder("="), copy=False)
            array.flags.writeable = False
            arrays.append(array)
        return arrays


def decode_tensor_stream(messages: Iterable[pb.TensorStreamMessage], *, max_bytes: int | None = None
                         ) -> tuple[list[str], list[np.ndarray]]:
    """Names and arrays from a ``DownloadModel`` stream (manifest first)."""
    assembler: TensorAssembler | None = None
    for message in messages:
        kind = message.WhichOneof("kind")
        if kind == "manifest":
            if assembler is not None:
                raise TensorDecodeError("a second manifest in one stream")
            assembler = TensorAssembler(layouts_from_manifest(message.manifest, max_bytes=max_bytes))
        elif kind == "chunk":
            if assembler is None:
                raise TensorDecodeError("a chunk before the manifest")
            assembler.add(message.chunk)
        else:
            raise TensorDecodeError("an empty stream message")
    if assembler is None:
        raise TensorDecodeError("the stream ended before its manifest")
    return [layout.name for layout in assembler.layouts], assembler.finish()


# ----- at rest ------------------------------------------------------------------------------------------

_META_KEY = "__meta__"


def arrays_to_bytes(named: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """An ``.npz`` archive of ``named`` arrays (order kept), with an optional JSON ``meta`` object."""
    if _META_KEY in named:
        raise ValueError(f"{_META_KEY!r} is reserved")
    payload = {k: np.asarray(v) for k, v in named.items()}
    if meta is not None:
        payload[_META_KEY] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **payload)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return buffer.getvalue()


def arrays_from_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and JSON meta of ``arrays_to_bytes``; never unpickles anything."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        named = {k: archive[k] for k in archive.files if k != _META_KEY}
        meta = json.loads(str(archive[_META_KEY])) if _META_KEY in archive.files else {}
    return named, meta
