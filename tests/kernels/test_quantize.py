"""The C++ quantizers are bit-identical to the numpy formats on every instruction set, and fast."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from msbnb_pass import formats as fm
from msbnb_pass.kernels import _lib
from msbnb_pass.kernels import quantize as kq

pytestmark = pytest.mark.skipif(not _lib.available(), reason="kernel library not built")
ISAS = _lib.supported_isas() if _lib.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    _lib.set_isa(request.param)
    yield request.param
    _lib.set_isa("auto")


CASES = [
    ((3, 70), 64),
    ((7, 13), 32),
    ((1, 1), 32),
    ((5,), 64),
    ((33, 65, 3), 128),
    ((256, 512), 64),
    ((100, 257), 4096),
]


@pytest.mark.parametrize(("shape", "bs"), CASES)
@pytest.mark.parametrize(("qt", "sym"), [("nf4", True), ("fp4", True), ("int4", True), ("int4", False)])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_quantizer_is_bit_identical_to_numpy(isa, shape, bs, qt, sym, dq):
    rng = np.random.default_rng(hash((shape, bs, qt)) % 2**32)
    A = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    if A.ndim == 2 and A.shape[0] > 3:
        A[2] = 0.0  # all-zero blocks
    p_ref, s_ref = fm.quantize_4bit(A, bs, qt, dq, symmetric=sym)
    p, s = kq.quantize_4bit(A, bs, qt, dq, symmetric=sym)
    np.testing.assert_array_equal(p, p_ref)
    assert s.equals(s_ref)  # absmax, nested absmax, offset, block offsets: exactly


def test_bitsandbytes_golden_through_the_fast_path(bnb_golden):
    for key in bnb_golden:
        if key.startswith("q4/") and key.endswith("/packed"):
            _, name, qt, bs, _ = key.split("/")
            p, s = kq.quantize_4bit(bnb_golden[f"input/{name}"], int(bs), qt)
            np.testing.assert_array_equal(p, bnb_golden[key])
            np.testing.assert_array_equal(s.absmax, bnb_golden[key.replace("/packed", "/absmax")])


@settings(max_examples=40, deadline=None)
@given(
    A=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=300), elements=st.floats(-1e5, 1e5, width=32)
    ),
    qt=st.sampled_from(["nf4", "fp4", "int4"]),
    bs=st.sampled_from([32, 64, 256]),
)
def test_4bit_quantizer_fuzz(A, qt, bs):
    p_ref, s_ref = fm.quantize_4bit(A, bs, qt)
    p, s = kq.quantize_4bit(A, bs, qt)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(s.absmax, s_ref.absmax)


@pytest.mark.parametrize("shape", [(3, 70), (64, 333), (1, 1), (5, 128)])
def test_int8_rowwise_is_bit_identical(isa, shape):
    A = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    A[0, 0] = 1e-44  # a subnormal row absmax when the row is tiny
    if shape[0] > 1:
        A[1] = 0.0
    cb, scb = kq.int8_vectorwise_quant(A)
    cb_ref, scb_ref = fm.int8_vectorwise_quant(A)
    np.testing.assert_array_equal(cb, cb_ref)
    np.testing.assert_array_equal(scb, scb_ref)
    q, s, o = kq.quantize_int8(A)
    q_ref, s_ref, _ = fm.quantize_int8(A)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)


def test_non_finite_input_is_refused_with_the_numpy_message():
    A = np.ones((4, 64), np.float32)
    A[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"A contains 1 non-finite value\(s\) \(NaN/Inf\), first at index \(1, 3\)"):
        kq.quantize_4bit(A)
