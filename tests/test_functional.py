"""The seed's functional API on MindSpore Tensors, including its examples exactly as written."""

from __future__ import annotations

import math

import numpy as np
import pytest

import msbnb_pass
from msbnb_pass import formats as fm


@pytest.fixture
def weight(ms_cpu):
    rng = np.random.default_rng(0)
    return ms_cpu.Tensor((rng.standard_normal((3072, 768)) * 0.02).astype(np.float32))


def test_seed_overview_example(weight):
    # 核心功能 -> 2. 函数式接口
    from msbnb_pass import dequantize_8bit, estimate_quantization_error, quantize_8bit

    # 量化
    weight_int8, scale, offset = quantize_8bit(weight, symmetric=True)

    # 反量化
    weight_fp = dequantize_8bit(weight_int8, scale, offset)

    # 误差估计
    error_stats = estimate_quantization_error(weight_fp, weight_int8, scale, offset)

    assert weight_int8.dtype == msbnb_pass.functional.ms.int8 and tuple(weight_int8.shape) == (3072, 768)
    assert offset is None and tuple(scale.shape) == (3072,)
    # weight_fp is the dequantized weight itself, so the error is exactly zero
    assert error_stats["max_abs_error"] == 0.0 and error_stats["cosine_similarity"] == pytest.approx(1.0)


def test_seed_api_reference_listing_runs_as_written(weight):
    # API 参考 -> 函数式接口, line by line
    from msbnb_pass import (
        dequantize_4bit,
        dequantize_8bit,
        estimate_quantization_error,
        get_quantization_info,
        quantize_4bit,
        quantize_8bit,
    )

    # 量化
    weight_int8, scale, offset = quantize_8bit(weight, symmetric=True)
    weight_int4, scale, offset = quantize_4bit(weight, group_size=128)

    # 反量化
    weight_fp = dequantize_8bit(weight_int8, scale, offset)
    weight_fp = dequantize_4bit(weight_int4, scale, offset, group_size=128)

    # 误差估计
    error_stats = estimate_quantization_error(weight_fp, weight_int8, scale, offset)
    info = get_quantization_info(weight, num_bits=8, symmetric=True)

    assert tuple(weight_int4.shape) == (3072, 384) and tuple(scale.shape) == (3072, 6)
    assert tuple(weight_fp.shape) == (3072, 768)
    assert set(error_stats) >= {"max_abs_error", "mean_abs_error", "relative_error", "sqnr_db", "cosine_similarity"}
    assert info["num_bits"] == 8 and info["shape"] == (3072, 768)


def test_seed_scenario_4(weight):
    # 场景 4: 量化分析
    from msbnb_pass import estimate_quantization_error, get_quantization_info, quantize_8bit

    weight_int8, scale, offset = quantize_8bit(weight)
    error_stats = estimate_quantization_error(weight, weight_int8, scale, offset)
    info = get_quantization_info(weight, num_bits=8)
    # INT8 per-channel on a Gaussian weight: SQNR close to the 6.02 dB/bit rule minus the crest factor
    assert 35 < error_stats["sqnr_db"] < 45
    assert error_stats["relative_error"] < 0.01  # the seed's "INT8: < 1% relative error"
    assert info["compression_ratio"] == 4.0 and info["memory_saving"] == 0.75


def test_8bit_follows_the_format_definition(weight):
    """Checked against the definition, not against the numpy oracle the functions are built on: symmetric
    q = round(w * 127 / absmax) with scale = absmax / 127; asymmetric [min(w, 0), max(w, 0)] onto [-128, 127]
    with an integer zero point; dequantize = (q - offset) * scale; every weight within half a step."""
    w = weight.asnumpy().astype(np.float64)
    for symmetric in (True, False):
        for per_channel in (True, False):
            q, scale, offset = msbnb_pass.quantize_8bit(weight, symmetric=symmetric, per_channel=per_channel)
            q, scale = q.asnumpy(), scale.asnumpy()
            assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == np.float32
            assert scale.shape == ((w.shape[0],) if per_channel else (1,))
            s = scale.astype(np.float64).reshape(-1, 1)
            axis = 1 if per_channel else None
            if symmetric:
                assert offset is None
                absmax = np.abs(w).max(axis=axis, keepdims=True)
                np.testing.assert_array_equal(scale.reshape(s.shape), (absmax / 127).astype(np.float32))
                exact = w * 127 / absmax
                assert np.all(np.abs(q - exact) <= 0.5 + 1e-5)  # nearest (ties within float32 rounding)
                assert np.all(np.abs(q).max(axis=axis) == 127)  # the absmax maps onto +-127
                deq_ref = q.astype(np.float64) * s
            else:
                off = offset.asnumpy().astype(np.float64).reshape(-1, 1)
                assert np.all(off == np.rint(off)) and np.all((off >= -128) & (off <= 127))
                lo = np.minimum(w.min(axis=axis, keepdims=True), 0)
                hi = np.maximum(w.max(axis=axis, keepdims=True), 0)
                np.testing.assert_allclose(s.reshape(lo.shape), (hi - lo) / 255, rtol=2**-23)
                assert q.min() == -128 or q.max() == 127
                deq_ref = (q.astype(np.float64) - off) * s
            deq = msbnb_pass.dequantize_8bit(*msbnb_pass.quantize_8bit(weight, symmetric, per_channel)).asnumpy()
            # one float32 rounding of the product (q - offset) * scale, whose factors are exact
            assert np.all(np.abs(deq - deq_ref) <= np.abs(deq_ref) * 2**-24)
            step = np.broadcast_to(s, w.shape)
            assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-4))


@pytest.mark.parametrize("quant_type", ["int4", "nf4", "fp4"])
def test_4bit_row_groups_equal_the_bitsandbytes_layout_when_rows_divide(weight, quant_type):
    """With in_features a multiple of group_size, the seed's per-row groups are bitsandbytes' blocks."""
    packed, scale, offset = msbnb_pass.quantize_4bit(weight, group_size=128, quant_type=quant_type)
    ref_packed, ref_state = fm.quantize_4bit(weight.asnumpy(), 128, quant_type)
    np.testing.assert_array_equal(packed.asnumpy().reshape(-1), ref_packed.reshape(-1))
    np.testing.assert_array_equal(scale.asnumpy().reshape(-1), ref_state.absmax)
    deq = msbnb_pass.dequantize_4bit(packed, scale, offset, group_size=128, quant_type=quant_type).asnumpy()
    np.testing.assert_array_equal(deq, fm.dequantize_4bit(ref_packed, ref_state))


@pytest.mark.parametrize("cols", [1, 33, 130, 257])
def test_4bit_odd_and_partial_rows(ms_cpu, cols):
    rng = np.random.default_rng(cols)
    w = rng.standard_normal((5, cols)).astype(np.float32)
    for symmetric in (True, False):
        packed, scale, offset = msbnb_pass.quantize_4bit(ms_cpu.Tensor(w), group_size=64, symmetric=symmetric)
        assert tuple(packed.shape) == (5, math.ceil(cols / 2)) and tuple(scale.shape) == (5, math.ceil(cols / 64))
        deq = msbnb_pass.dequantize_4bit(packed, scale, offset, group_size=64, in_features=cols).asnumpy()
        assert deq.shape == w.shape
        groups = np.arange(cols) // 64
        s = scale.asnumpy()[:, groups]
        half_step = s / 14 if symmetric else s / 15  # absmax/7 steps, or 16 levels over 2 * half-range
        assert np.all(np.abs(deq - w) <= half_step * (1 + 1e-5) + 1e-7)


def test_error_metrics_are_right(ms_cpu):
    w = np.array([[3.0, 4.0]], np.float32)
    q = np.array([[3.0, 3.0]], np.float32)
    m = msbnb_pass.functional._error_metrics(w, q)
    assert m["max_abs_error"] == 1.0 and m["mean_abs_error"] == 0.5 and m["mse"] == 0.5
    assert m["relative_error"] == pytest.approx(1 / 5)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25 / 1))
    assert m["cosine_similarity"] == pytest.approx((9 + 12) / (5 * math.sqrt(18)))


def test_quantization_info(ms_cpu):
    w = ms_cpu.Tensor(np.array([[-2.0, 0.5], [1.0, 4.0]], np.float32))
    info = msbnb_pass.get_quantization_info(w, num_bits=8, symmetric=True)
    assert info["absmax"] == 4.0 and info["scale"] == pytest.approx(4 / 127) and info["zero_point"] == 0.0
    asym = msbnb_pass.get_quantization_info(w, num_bits=8, symmetric=False)
    assert asym["scale"] == pytest.approx(6 / 255)
    assert -2.0 == pytest.approx((-128 - asym["zero_point"]) * asym["scale"], abs=asym["scale"] / 2)
    assert msbnb_pass.get_quantization_info(w, num_bits=4)["quantized_bytes"] == 2


def test_functional_bad_input(ms_cpu):
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(2, 3, 4\)"):
        msbnb_pass.quantize_8bit(ms_cpu.Tensor(np.ones((2, 3, 4), np.float32)))
    with pytest.raises(TypeError, match="weight must be a floating-point array.*got dtype int32"):
        msbnb_pass.quantize_4bit(ms_cpu.Tensor(np.ones((2, 64), np.int32)))
    with pytest.raises(ValueError, match=r"weight contains 1 non-finite value\(s\)"):
        msbnb_pass.quantize_4bit(np.array([[1.0, np.nan]], np.float32), group_size=32)
    with pytest.raises(ValueError, match="group_size must be a power of two in \\[32, 4096\\].*got 100"):
        msbnb_pass.quantize_4bit(np.ones((2, 64), np.float32), group_size=100)
    with pytest.raises(ValueError, match="quant_type must be one of \\('nf4', 'fp4', 'int4'\\), got 'int3'"):
        msbnb_pass.quantize_4bit(np.ones((2, 64), np.float32), quant_type="int3")
    packed, scale, _ = msbnb_pass.quantize_4bit(np.ones((2, 64), np.float32), group_size=32)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 1\) for 2x64 in groups of 64, got \(2, 2\)"):
        msbnb_pass.dequantize_4bit(packed, scale, group_size=64)
    with pytest.raises(ValueError, match="in_features=70 does not fit a packed width of 32 bytes"):
        msbnb_pass.dequantize_4bit(packed, scale, group_size=32, in_features=70)
    with pytest.raises(TypeError, match="weight_q must be int8 .* or uint8"):
        msbnb_pass.estimate_quantization_error(np.ones((2, 64), np.float32), np.ones((2, 64), np.float32), scale)
    with pytest.raises(ValueError, match="num_bits must be one of"):
        msbnb_pass.get_quantization_info(np.ones((2, 2), np.float32), num_bits=16)
