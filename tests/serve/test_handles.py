"""Which calls into a model fit a gRPC message (``serve.handles``); the routes themselves are
exercised on a real Serve in ``test_replica_calls.py``."""

from __future__ import annotations

from mmembed.embedding.model import Media
from mmembed.encoders import Prepared
from mmembed.serve.handles import GRPC_MAX_BYTES, GRPC_MAX_ITEMS, fits_grpc


def test_small_requests_fit_and_large_ones_do_not():
    assert fits_grpc([])
    assert fits_grpc(["a red circle"] * GRPC_MAX_ITEMS)
    assert not fits_grpc(["a"] * (GRPC_MAX_ITEMS + 1))  # the answer grows with the items
    assert fits_grpc([b"\x00" * GRPC_MAX_BYTES])
    assert not fits_grpc([b"\x00" * GRPC_MAX_BYTES, b"\x00"])


def test_a_text_counts_at_its_largest_encoding():
    chars = GRPC_MAX_BYTES // 4
    assert fits_grpc(["x" * chars])
    assert not fits_grpc(["é" * (chars + 1)])  # 4 bytes a character at most: counted so, whatever it holds


def test_anything_but_texts_and_bytes_goes_by_reference():
    assert not fits_grpc([Media("0" * 64, Prepared(b""))])
