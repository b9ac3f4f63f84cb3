"""8-bit formats: LLM.int8() row-wise quantization, symmetric/asymmetric INT8, the mixed matmul."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from msbnb_pass import formats as fm


def test_vectorwise_quant_is_bitsandbytes_bytes(bnb_golden):
    for name in ("a3x70", "a130x257", "a7x13"):
        CB, SCB = fm.int8_vectorwise_quant(bnb_golden[f"input/{name}"])
        np.testing.assert_array_equal(CB, bnb_golden[f"int8/{name}/CB"])
        np.testing.assert_array_equal(SCB.view(np.uint32), bnb_golden[f"int8/{name}/SCB"].view(np.uint32))


@settings(max_examples=50, deadline=None)
@given(
    A=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=50), elements=st.floats(-1e3, 1e3, width=32)
    )
)
def test_rowwise_error_is_at_most_half_a_step(A):
    CB, SCB = fm.int8_vectorwise_quant(A)
    assert CB.dtype == np.int8 and np.abs(CB.astype(int)).max(initial=0) <= 127
    np.testing.assert_array_equal(SCB, np.abs(A).max(axis=1))
    err = np.abs(fm.int8_vectorwise_dequant(CB, SCB) - A)
    assert np.all(err <= SCB[:, None] / 254 * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_int8(per_channel):
    W = np.random.default_rng(0).standard_normal((64, 96), dtype=np.float32) * np.linspace(0.1, 3, 64)[:, None]
    q, scale, offset = fm.quantize_int8(W, symmetric=True, per_channel=per_channel)
    assert offset is None and q.dtype == np.int8
    assert scale.shape == ((64,) if per_channel else (1,))
    if per_channel:
        CB, SCB = fm.int8_vectorwise_quant(W)
        np.testing.assert_array_equal(q, CB)  # per-channel symmetric INT8 is LLM.int8's weight format
        np.testing.assert_allclose(scale * 127, SCB, rtol=1e-6)
    err = np.abs(fm.dequantize_int8(q, scale) - W)
    assert np.all(err <= scale.reshape(-1, 1) / 2 * (1 + 1e-5))


@pytest.mark.parametrize("per_channel", [True, False])
def test_asymmetric_int8_uses_the_full_range(per_channel):
    W = np.random.default_rng(1).uniform(-0.5, 2.0, (32, 48)).astype(np.float32)
    q, scale, offset = fm.quantize_int8(W, symmetric=False, per_channel=per_channel)
    axis = 1 if per_channel else None
    assert np.all(q.min(axis=axis) == -128) and np.all(q.max(axis=axis) == 127)  # [min, max] spans all 256 levels
    np.testing.assert_array_equal(offset, np.rint(offset))  # integer zero point: 0.0 is exact
    deq = fm.dequantize_int8(q, scale, offset)
    assert np.all(np.abs(deq - W) <= scale.reshape(-1, 1) / 2 * (1 + 1e-4))
    zero = fm.dequantize_int8(np.full((1, 1), offset.reshape(-1)[0], np.int8), scale[:1], offset[:1])
    assert zero[0, 0] == 0.0


def test_all_zero_rows_and_weights():
    W = np.zeros((3, 8), np.float32)
    W[1] = 1.0
    CB, SCB = fm.int8_vectorwise_quant(W)
    assert SCB.tolist() == [0.0, 1.0, 0.0] and CB[0].tolist() == [0] * 8
    for sym in (True, False):
        q, s, o = fm.quantize_int8(np.zeros((2, 4), np.float32), symmetric=sym)
        np.testing.assert_array_equal(fm.dequantize_int8(q, s, o), 0.0)


def _int8_error_bound(x, W, CB, SCB, threshold):
    """Worst-case |int8_mixed_matmul - x @ W.T| from rounding each operand by at most half a step."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    xq = x64.copy()
    cols = fm.outlier_columns(x, threshold)
    xq[np.abs(xq) >= threshold if threshold > 0 else np.zeros_like(xq, bool)] = 0
    sca = np.abs(xq).max(axis=1)
    dx = np.broadcast_to(sca[:, None] / 254, x.shape).copy()
    dx[:, cols] = 0
    dW = np.broadcast_to(SCB.astype(np.float64)[:, None] / 254, W.shape)
    bound = np.abs(x64) @ dW.T + dx @ (np.abs(W64) + dW).T
    return bound + 1e-5 * (np.abs(x64) @ np.abs(W64).T) + 1e-6


@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
def test_llm_int8_decomposition_against_float64(threshold):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    x[:, [3, 100, 200]] *= 12.0  # systematic outlier features, as in large models
    W = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    CB, SCB = fm.int8_vectorwise_quant(W)
    out = fm.int8_mixed_matmul(x, CB, SCB, threshold=threshold, bias=bias)
    ref = x.astype(np.float64) @ W.astype(np.float64).T + bias
    assert out.shape == (16, 64) and out.dtype == np.float32
    assert np.all(np.abs(out - ref) <= _int8_error_bound(x, W, CB, SCB, threshold))
    if threshold:
        assert set(fm.outlier_columns(x, threshold).tolist()) >= {3, 100, 200}


def test_outlier_decomposition_reduces_error():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x[:, 7] = 60.0  # one huge feature ruins the row scale without decomposition
    W = (rng.standard_normal((128, 512)) * 0.05).astype(np.float32)
    CB, SCB = fm.int8_vectorwise_quant(W)
    ref = x.astype(np.float64) @ W.astype(np.float64).T
    err_plain = np.abs(fm.int8_mixed_matmul(x, CB, SCB, threshold=0.0) - ref).mean()
    err_split = np.abs(fm.int8_mixed_matmul(x, CB, SCB, threshold=6.0) - ref).mean()
    assert err_split < err_plain / 4


def test_mixed_matmul_handles_nd_inputs_and_matches_2d():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    CB, SCB = fm.int8_vectorwise_quant(rng.standard_normal((8, 40)).astype(np.float32))
    out = fm.int8_mixed_matmul(x, CB, SCB, 1.5)
    np.testing.assert_array_equal(out.reshape(6, 8), fm.int8_mixed_matmul(x.reshape(6, 40), CB, SCB, 1.5))


def test_int8_bad_input():
    CB, SCB = fm.int8_vectorwise_quant(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="x has 7 features but CB expects 8"):
        fm.int8_mixed_matmul(np.ones((2, 7), np.float32), CB, SCB)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        fm.int8_mixed_matmul(np.ones((2, 8), np.float32), CB, SCB, threshold=-1.0)
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(8,\)"):
        fm.quantize_int8(np.ones(8, np.float32))
    with pytest.raises(TypeError, match="q must be int8, got dtype int32"):
        fm.dequantize_int8(np.ones((2, 2), np.int32), np.ones(2))
    with pytest.raises(
        ValueError, match=r"scale must have 1 entry \(per tensor\), 2 \(per row\) or shape \[2, groups\]"
    ):
        fm.dequantize_int8(np.ones((2, 2), np.int8), np.ones(3))


def test_groupwise_int8():
    W = np.random.default_rng(4).standard_normal((6, 100)).astype(np.float32)
    W[:, 64:] *= 20  # the second group has a much larger range: its own scale keeps the first one precise
    for sym in (True, False):
        q, scale, offset = fm.quantize_int8(W, symmetric=sym, group_size=64)
        assert q.shape == W.shape and scale.shape == (6, 2)
        err = np.abs(fm.dequantize_int8(q, scale, offset) - W)
        assert np.all(err[:, :64] <= scale[:, :1] / 2 * (1 + 1e-4))
        assert np.all(err[:, 64:] <= scale[:, 1:] / 2 * (1 + 1e-4))
        assert err[:, :64].max() < np.abs(fm.dequantize_int8(*fm.quantize_int8(W, symmetric=sym)) - W)[:, :64].max()
