"""Tensors on the wire and at rest: exact round trips, chunking, and strict refusal of malformed streams."""

from __future__ import annotations

import numpy as np
import pytest

from fedrecon.tensors import (
    TensorAssembler,
    TensorDecodeError,
    TensorLayout,
    arrays_from_bytes,
    arrays_to_bytes,
    check_layouts,
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
