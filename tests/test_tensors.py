"""Tensors on the wire and at rest: exact round trips, chunking, and strict refusal of malformed streams."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrecon.tensors import (
    TensorAssembler,
    TensorDecodeError,
    TensorLayout,
    arrays_from_bytes,
    arrays_to_bytes,
    check_layouts,
    chunk_view,
    chunks,
    decode_tensor_stream,
    layouts_from_manifest,
    manifest,
    tensor_stream,
)
from fedrecon.v1 import coordinator_pb2 as pb


def _arrays() -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return (["item_embedding", "item_bias", "global_bias", "counts"],
            [rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=37).astype(np.float32),
             np.asarray(3.5, np.float32), np.arange(4, dtype=np.int64)])


def test_stream_round_trip_is_exact_and_chunked() -> None:
    names, arrays = _arrays()
    messages = list(tensor_stream(names, arrays, chunk_bytes=64))
    # 37*5*4 = 740 bytes -> 12 chunks of <= 64; 148 -> 3; 4 -> 1; 32 -> 1; plus the manifest.
    assert len(messages) == 1 + 12 + 3 + 1 + 1
    assert all(len(m.chunk.data) <= 64 for m in messages[1:])
    got_names, got = decode_tensor_stream(messages)
    assert got_names == names
    for a, b in zip(arrays, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_decoded_arrays_are_read_only() -> None:
    _, (array,) = decode_tensor_stream(list(tensor_stream(["x"], [np.ones(3, np.float32)])))
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 5.0


def test_empty_tensor_sends_no_chunk_and_decodes() -> None:
    messages = list(tensor_stream(["e", "x"], [np.zeros((0, 3), np.float32), np.ones(2, np.float32)]))
    assert len(messages) == 2  # manifest + one chunk for "x"
    _, (e, x) = decode_tensor_stream(messages)
    assert e.shape == (0, 3)
    np.testing.assert_array_equal(x, [1.0, 1.0])


def _assembler_for(arrays: list[np.ndarray]) -> TensorAssembler:
    return TensorAssembler(layouts_from_manifest(manifest([f"t{i}" for i in range(len(arrays))], arrays)))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda cs: cs[1:], "offset 16, expected 0"),                       # first chunk lost
    (lambda cs: [cs[0], cs[0], *cs[1:]], "offset 0, expected 16"),       # chunk repeated
    (lambda cs: [cs[2], cs[0], cs[1]], "tensor 1 while tensor 0"),       # out of order
    (lambda cs: cs[:-1], "stream ended after 0 of 8 bytes"),             # stream stopped half way
])
def test_malformed_chunk_sequences_are_refused(mutate, message) -> None:  # type: ignore[no-untyped-def]
    arrays = [np.arange(8, dtype=np.float32), np.arange(2, dtype=np.float32)]
    cs = list(chunks(arrays, chunk_bytes=16))
    assert len(cs) == 3
    assembler = _assembler_for(arrays)
    with pytest.raises(TensorDecodeError, match=message):
        for c in mutate(cs):
            assembler.add(c)
        assembler.finish()


def test_oversized_chunk_and_bad_index_are_refused() -> None:
    assembler = _assembler_for([np.zeros(2, np.float32)])
    with pytest.raises(TensorDecodeError, match="does not fit"):
        assembler.add(pb.TensorChunk(tensor_index=0, offset=0, data=b"\0" * 9))
    with pytest.raises(TensorDecodeError, match="manifest has 1"):
        assembler.add(pb.TensorChunk(tensor_index=5, offset=0, data=b"\0" * 4))


def test_manifest_checks() -> None:
    expected = [TensorLayout("item_embedding", np.dtype(np.float32), (3, 2))]
    ok = layouts_from_manifest(manifest(["item_embedding"], [np.zeros((3, 2), np.float32)]))
    check_layouts(ok, expected)
    with pytest.raises(TensorDecodeError, match="unknown: \\['user_embedding'\\]"):
        check_layouts(layouts_from_manifest(manifest(["user_embedding"], [np.zeros((3, 2), np.float32)])),
                      expected)
    with pytest.raises(TensorDecodeError, match="shape \\[2, 3\\]"):
        check_layouts(layouts_from_manifest(manifest(["item_embedding"], [np.zeros((2, 3), np.float32)])),
                      expected)
    with pytest.raises(TensorDecodeError, match="dtype float64"):
        check_layouts(layouts_from_manifest(manifest(["item_embedding"], [np.zeros((3, 2))])), expected)
    with pytest.raises(TensorDecodeError, match="1000-byte limit"):
        layouts_from_manifest(manifest(["big"], [np.zeros(1000, np.float32)]), max_bytes=1000)
    bad = pb.TensorManifest(tensors=[pb.TensorSpec(name="x", dtype=99, shape=[1])])
    with pytest.raises(TensorDecodeError, match="unknown dtype"):
        layouts_from_manifest(bad)


def test_at_rest_round_trip_keeps_order_and_meta() -> None:
    names, arrays = _arrays()
    named, meta = arrays_from_bytes(arrays_to_bytes(dict(zip(names, arrays, strict=True)), {"version": 3}))
    assert list(named) == names
    assert meta == {"version": 3}
    for a, name in zip(arrays, names, strict=True):
        np.testing.assert_array_equal(named[name], a)


# ----- chunk_view: a chunk read from its message's bytes without a copy ---------------------------------
def _chunk_message(index: int, offset: int, data: bytes) -> bytes:
    chunk = pb.TensorChunk(tensor_index=index, offset=offset, data=data)
    return pb.ReportUpdateRequest(chunk=chunk).SerializeToString()


def _as_protobuf_says(message: bytes) -> tuple[int, int, bytes] | None:
    """What protobuf reads from ``message``: the chunk's fields, or None (not a chunk, or not protobuf)."""
    try:
        parsed = pb.ReportUpdateRequest.FromString(message)
    except DecodeError:
        return None
    if parsed.WhichOneof("kind") != "chunk":
        return None
    return parsed.chunk.tensor_index, parsed.chunk.offset, parsed.chunk.data


@pytest.mark.parametrize(("index", "offset", "data"), [
    (0, 0, b"\x01\x02\x03\x04"), (1, 0, b"abcd" * 100), (0, 4096, b"x" * 300), (3, 2**40, b"yz"),
    (2**32 - 1, 2**64 - 1, b"\x00" * 200), (0, 0, b""), (5, 7, b"")])
def test_chunk_view_reads_what_protobuf_reads(index: int, offset: int, data: bytes) -> None:
    message = _chunk_message(index, offset, data)
    view = chunk_view(message)
    assert view is not None
    assert (view.tensor_index, view.offset, bytes(view.data)) == (index, offset, data)
    assert _as_protobuf_says(message) == (index, offset, data)
    stream_message = pb.TensorStreamMessage(chunk=pb.TensorChunk(
        tensor_index=index, offset=offset, data=data)).SerializeToString()
    assert stream_message == message  # the same field number in both messages


def test_chunk_view_shares_the_message_bytes() -> None:
    """The decoded tensor is a view of the received message: no copy of the tensor's bytes is made."""
    values = np.arange(25_000, dtype=np.float32)  # 100,000 bytes: the framing leaves them 8-byte aligned
    message = _chunk_message(0, 0, values.tobytes())
    assembler = TensorAssembler([TensorLayout("t", np.dtype("<f4"), (250, 100))])
    view = chunk_view(message)
    assert view is not None
    assembler.add(view)
    (array,) = assembler.finish()
    np.testing.assert_array_equal(array.reshape(-1), values)
    assert np.shares_memory(array, np.frombuffer(message, np.uint8))
    assert not array.flags.writeable


@pytest.mark.parametrize("message", [
    b"",  # the empty message: no chunk
    pb.ReportUpdateRequest(header=pb.ReportHeader(client_id="c")).SerializeToString(),
    _chunk_message(1, 2, b"abc") + _chunk_message(1, 5, b"def"),  # two chunks: protobuf merges them
    _chunk_message(1, 2, b"abc") + b"\x08\x01",  # a field after the chunk
    b"\x12\x07\x10\x02\x08\x01\x1a\x01z",  # fields out of order
    b"\x12\x06\x08\x01\x08\x02\x1a\x01z",  # a field twice
    b"\x12\x05\x1a\x01z\x20\x01",  # an unknown field after the data
    b"\x12\x08\x08\x80\x80\x80\x80\x10\x1a\x01z",  # tensor_index beyond 32 bits (protobuf truncates it)
    b"\x12\x05\x1a\x04zz",  # data longer than the message
    b"\x12\x09\x1a\x01z",  # a chunk longer than the message
    b"\x12\x03\x1a\x01z\x00",  # bytes after the chunk
    b"\x12",  # cut inside the framing
    b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an 11-byte varint
])
def test_chunk_view_leaves_every_other_encoding_to_protobuf(message: bytes) -> None:
    view = chunk_view(message)
    if view is not None:  # read here only where protobuf reads the very same chunk
        assert _as_protobuf_says(message) == (view.tensor_index, view.offset, bytes(view.data))


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda i, o, d, cut, extra: (_chunk_message(i, o, d) + extra)[:cut],
              st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=20),
              st.integers(0, 60), st.binary(max_size=4))))
def test_chunk_view_never_disagrees_with_protobuf(message: bytes) -> None:
    view = chunk_view(message)
    if view is not None:
        assert _as_protobuf_says(message) == (view.tensor_index, view.offset, bytes(view.data))


def test_a_chunk_view_out_of_alignment_is_copied_once_aligned() -> None:
    """numpy copies a misaligned array at every dot product: such a view is copied once, up front."""
    values = np.arange(1000, dtype=np.float32)
    message = _chunk_message(0, 0, values.tobytes())  # 6 bytes of framing before the tensor's
    view = chunk_view(message)
    assert view is not None and np.frombuffer(view.data, np.uint8).ctypes.data % 8 != 0
    assembler = TensorAssembler([TensorLayout("t", np.dtype("<f4"), (1000,))])
    assembler.add(view)
    (array,) = assembler.finish()
    np.testing.assert_array_equal(array, values)
    assert array.flags.aligned and array.ctypes.data % 8 == 0 and not array.flags.writeable
    assert not np.shares_memory(array, np.frombuffer(message, np.uint8))
