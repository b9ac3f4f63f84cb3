"""4-bit and 8-bit blockwise formats: bit-exactness with bitsandbytes, bounds from its tests, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from msbnb_pass import formats as fm
from msbnb_pass.formats.blockwise import nearest_code

# Mean abs error / mean relative error on randn(1024, 1024) quantize -> dequantize, per block size, from
# bitsandbytes' own test_4bit_quant (averages of 1k samples; it allows +1e-3 on top).
BNB_BOUNDS = {
    "nf4": {
        "err": {
            64: 0.072792,
            128: 0.076835,
            256: 0.080326,
            512: 0.083535,
            1024: 0.086603,
            2048: 0.089592,
            4096: 0.092537,
        },
        "rel_err": {
            64: 0.203299,
            128: 0.215252,
            256: 0.226044,
            512: 0.236021,
            1024: 0.245365,
            2048: 0.254146,
            4096: 0.262457,
        },
    },
    "fp4": {
        "err": {
            64: 0.096545,
            128: 0.102947,
            256: 0.108685,
            512: 0.114087,
            1024: 0.119312,
            2048: 0.124460,
            4096: 0.129573,
        },
        "rel_err": {
            64: 0.260130,
            128: 0.275734,
            256: 0.289842,
            512: 0.302852,
            1024: 0.314982,
            2048: 0.326402,
            4096: 0.337228,
        },
    },
}


def _golden_cases(golden):
    for key in golden:
        if key.startswith("q4/") and key.endswith("/packed"):
            _, name, qt, bs, _ = key.split("/")
            yield name, qt, int(bs)


def test_packed_bytes_and_absmax_are_bitsandbytes_bytes(bnb_golden):
    cases = list(_golden_cases(bnb_golden))
    assert len(cases) == 50
    for name, qt, bs in cases:
        A = bnb_golden[f"input/{name}"]
        packed, state = fm.quantize_4bit(A, blocksize=bs, quant_type=qt)
        ref_packed = bnb_golden[f"q4/{name}/{qt}/{bs}/packed"]
        ref_absmax = bnb_golden[f"q4/{name}/{qt}/{bs}/absmax"]
        assert packed.dtype == np.uint8 and packed.shape == ref_packed.shape, (name, qt, bs)
        np.testing.assert_array_equal(packed, ref_packed, err_msg=f"{name} {qt} bs={bs}")
        np.testing.assert_array_equal(state.absmax.view(np.uint32), ref_absmax.view(np.uint32))
        assert state.shape == A.shape and state.dtype == "float32"


def test_double_quant_codes_are_the_nearest_and_match_bitsandbytes(bnb_golden):
    code = fm.create_dynamic_map(signed=True)
    for prefix in {k.rsplit("/", 1)[0] for k in bnb_golden if k.startswith("dq/") and k.endswith("/packed")}:
        _, name, qt, bs = prefix.split("/")
        A = bnb_golden[f"input/{name}"]
        packed, state = fm.quantize_4bit(A, blocksize=int(bs), quant_type=qt, compress_statistics=True)
        np.testing.assert_array_equal(packed, bnb_golden[f"{prefix}/packed"])
        ref_codes = bnb_golden[f"{prefix}/sd/absmax"].astype(int)
        ours = state.absmax.astype(int)
        assert state.absmax.dtype == np.uint8 and ours.shape == ref_codes.shape
        # nested absmax: float32 absmax of 256-blocks of (absmax - offset), equal up to the offset's last bit
        np.testing.assert_allclose(state.state2.absmax, bnb_golden[f"{prefix}/sd/nested_absmax"], rtol=1e-6)
        np.testing.assert_array_equal(state.state2.code, bnb_golden[f"{prefix}/sd/nested_quant_map"])
        # each 8-bit code is the exact nearest code of the dynamic map ...
        plain = fm.quantize_4bit(A, blocksize=int(bs), quant_type=qt)[1].absmax
        scaled = (plain - state.offset) / np.repeat(state.state2.absmax, 256)[: plain.size]
        dist = np.abs(scaled[:, None] - code[None, :])
        assert np.all(np.abs(scaled - code[ours]) <= dist.min(axis=1))
        # ... and on these recorded tensors bitsandbytes' lookup-table rounding picked the same codes
        np.testing.assert_array_equal(ours, ref_codes)


def test_4bit_error_bounds_from_bitsandbytes_tests():
    A = np.random.default_rng(7).standard_normal((1024, 1024), dtype=np.float32)
    for qt, bounds in BNB_BOUNDS.items():
        for bs in (64, 128, 256, 512, 1024, 2048, 4096):
            packed, state = fm.quantize_4bit(A, blocksize=bs, quant_type=qt)
            err = np.abs(A - fm.dequantize_4bit(packed, state)).astype(np.float64)
            assert err.mean() < bounds["err"][bs] + 1e-3, (qt, bs, err.mean())
            assert (err / (np.abs(A) + 1e-8)).mean() < bounds["rel_err"][bs] + 1e-3, (qt, bs)
            # and not far below either: a broken quantizer that rounds better than NF4 can does not exist
            assert err.mean() > bounds["err"][bs] - 2e-3, (qt, bs, err.mean())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 128])
def test_double_quant_error_bounds(qt, bs):
    A = np.random.default_rng(bs).standard_normal((1024, 1024), dtype=np.float32)
    for compress in (False, True):
        packed, state = fm.quantize_4bit(A, blocksize=bs, quant_type=qt, compress_statistics=compress)
        err = np.abs(A - fm.dequantize_4bit(packed, state)).astype(np.float64)
        assert err.mean() < 0.11 and (err / (np.abs(A) + 1e-15)).mean() < 0.28
    # the decoded absmax stays within one dynamic-map step of the real one
    plain = fm.quantize_4bit(A, blocksize=bs, quant_type=qt)[1]
    np.testing.assert_allclose(state.dequantized_absmax(), plain.absmax, rtol=0.02)


def test_nf4_dequantized_values_are_code_times_absmax():
    A = np.random.default_rng(0).standard_normal((5, 77), dtype=np.float32)
    packed, state = fm.quantize_4bit(A, 32, "nf4")
    idx = fm.unpack_4bit(packed, A.size)
    absmax = np.repeat(state.absmax, 32)[: A.size]
    expected = (fm.get_4bit_code("nf4")[idx] * absmax).reshape(A.shape)
    np.testing.assert_array_equal(fm.dequantize_4bit(packed, state), expected)
    # every value decodes to the nearest representable value of its block
    for i in range(0, A.size, 32):
        block = A.reshape(-1)[i : i + 32]
        grid = fm.get_4bit_code("nf4") * state.absmax[i // 32]
        best = np.abs(block[:, None] - grid[None, :]).min(axis=1)
        got = np.abs(block - expected.reshape(-1)[i : i + 32])
        assert np.all(got <= best + 1e-6)


def test_int4_symmetric_is_linear_absmax_over_7():
    A = np.array([[-1.0, -0.45, 0.0, 0.07, 0.55, 1.0] + [0.0] * 26], dtype=np.float32)
    packed, state = fm.quantize_4bit(A, 32, "int4")
    idx = fm.unpack_4bit(packed, A.size)
    assert idx[:6].tolist() == [1, 5, 8, 8, 12, 15]  # nibble q + 8 with q = round(7 x / absmax)
    assert state.absmax.tolist() == [1.0]
    out = fm.dequantize_4bit(packed, state)
    assert np.max(np.abs(out - A)) <= 0.5 / 7 + 1e-7


def test_int4_asymmetric_uses_block_range():
    rng = np.random.default_rng(3)
    A = (rng.uniform(2.0, 5.0, (4, 64))).astype(np.float32)  # all positive: symmetric wastes half the levels
    p_sym, s_sym = fm.quantize_4bit(A, 64, "int4")
    p_asym, s_asym = fm.quantize_4bit(A, 64, "int4", symmetric=False)
    err_sym = np.abs(fm.dequantize_4bit(p_sym, s_sym) - A).max()
    err_asym = np.abs(fm.dequantize_4bit(p_asym, s_asym) - A).max()
    half_range = (A.max(axis=1) - A.min(axis=1)) / 2
    assert err_asym <= half_range.max() / 15 + 1e-6  # half a step of 16 levels over the range
    assert err_asym < err_sym / 2
    np.testing.assert_allclose(s_asym.block_offset, (A.max(axis=1) + A.min(axis=1)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="symmetric=False is only defined for quant_type='int4'"):
        fm.quantize_4bit(A, 64, "nf4", symmetric=False)


def test_zero_blocks_give_zeros_not_nan():
    A = np.zeros((3, 100), np.float32)
    A[1, 5] = 2.0
    for qt in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            packed, state = fm.quantize_4bit(A, 64, qt, compress_statistics=dq)
            out = fm.dequantize_4bit(packed, state)
            assert np.isfinite(out).all()
            np.testing.assert_allclose(out, A, atol=1e-5 if dq else 0)
    # bitsandbytes' rule: full all-zero blocks keep absmax 0, the partial last block stores the 1e-38 floor
    _, state = fm.quantize_4bit(np.zeros(100, np.float32), 64, "nf4")
    assert state.absmax[0] == 0.0 and state.absmax[1] == np.float32(1e-38)


def test_bad_input_is_refused_with_clear_errors():
    A = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4', 'int4'\), got 'nf5'"):
        fm.quantize_4bit(A, 64, "nf5")
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\].*got 48"):
        fm.quantize_4bit(A, 48)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        fm.quantize_4bit(A, 64.0)
    with pytest.raises(ValueError, match=r"A is empty \(shape \(0, 64\)\)"):
        fm.quantize_4bit(np.zeros((0, 64), np.float32))
    with pytest.raises(TypeError, match="A must be a floating-point array.*got dtype int32"):
        fm.quantize_4bit(np.ones((4, 64), np.int32))
    bad = A.copy()
    bad[2, 7] = np.nan
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"A contains 2 non-finite value\(s\) \(NaN/Inf\), first at index \(2, 7\)"):
        fm.quantize_4bit(bad)
    packed, state = fm.quantize_4bit(A)
    with pytest.raises(ValueError, match=r"shape \(4, 64\) needs 128 packed bytes, got 127"):
        fm.dequantize_4bit(packed[:-1], state)


def test_float16_input_records_dtype_and_matches_float32_path():
    A = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float16)
    packed16, state16 = fm.quantize_4bit(A, 32, "nf4")
    packed32, _ = fm.quantize_4bit(A.astype(np.float32), 32, "nf4")
    assert state16.dtype == "float16"
    np.testing.assert_array_equal(packed16, packed32)


@settings(max_examples=60, deadline=None)
@given(codes=hnp.arrays(np.uint8, st.integers(0, 301), elements=st.integers(0, 15)))
def test_pack_unpack_roundtrip(codes):
    packed = fm.pack_4bit(codes)
    assert packed.shape == ((codes.size + 1) // 2, 1)
    np.testing.assert_array_equal(fm.unpack_4bit(packed, codes.size), codes)
    if codes.size >= 2:
        assert packed[0, 0] == (codes[0] << 4) | codes[1]  # first element in the high nibble


def test_pack_refuses_codes_above_15():
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\], got a maximum of 16"):
        fm.pack_4bit(np.array([1, 16], np.uint8))


@settings(max_examples=40, deadline=None)
@given(
    A=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    qt=st.sampled_from(["nf4", "fp4", "int4"]),
    bs=st.sampled_from([32, 64, 128]),
    dq=st.booleans(),
)
def test_quantize_dequantize_bounds_property(A, qt, bs, dq):
    packed, state = fm.quantize_4bit(A, bs, qt, compress_statistics=dq)
    out = fm.dequantize_4bit(packed, state)
    assert out.shape == A.shape and np.isfinite(out).all()
    absmax = np.repeat(state.dequantized_absmax(), bs)[: A.size].reshape(A.shape)
    # error per element is at most half the widest gap of the code table times the block absmax
    sorted_code = np.sort(fm.get_4bit_code(qt))
    half_gap = np.diff(sorted_code[sorted_code >= -1]).max() / 2
    true_absmax = np.repeat(fm.quantize_4bit(A, bs, qt)[1].absmax, bs)[: A.size].reshape(A.shape)
    slack = np.abs(absmax - true_absmax) + 1e-6 * true_absmax  # double quant moves the scale a little
    bound = half_gap * true_absmax + slack + 1e-30
    # bitsandbytes scales a block by 1 / max(absmax, 1e-38): a block of subnormal values is scaled as if its
    # absmax were 1e-38, so its codes only keep |code| <= 1 and the error is bounded by the block's size alone
    bound = np.where(true_absmax < 1e-38, 2 * true_absmax + slack + 1e-45, bound)
    assert np.all(np.abs(out - A) <= bound)
    # re-quantizing the dequantized tensor is stable (the codes are a fixed point) without double quant
    if not dq:
        again, _ = fm.quantize_4bit(out, bs, qt)
        np.testing.assert_array_equal(fm.dequantize_4bit(again, state), out)


def test_subnormal_block_is_scaled_like_bitsandbytes():
    """absmax below 1e-38 is clamped to 1e-38 for the scaling (bitsandbytes' rule): codes are chosen for
    value / 1e-38, then decoded with the true absmax."""
    A = np.array([5e-39, -3e-39, 1e-39, 0.0] * 16, np.float32)
    packed, state = fm.quantize_4bit(A, 64, "nf4")
    code = fm.get_4bit_code("nf4")
    scaled = np.clip(A.astype(np.float32) * np.float32(1 / np.float32(1e-38)), -1, 1)
    expected = np.abs(scaled[:, None] - code[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(fm.unpack_4bit(packed, A.size), expected)
    assert state.absmax[0] == np.float32(5e-39)
    np.testing.assert_array_equal(
        fm.dequantize_4bit(packed, state), (code[expected] * np.float32(5e-39)).astype(np.float32)
    )


def test_blockwise_8bit_dynamic_bounds():
    """bitsandbytes' test_dynamic_blockwise_quantization bounds: randn mean err < 0.011, rand < 0.0033."""
    rng = np.random.default_rng(11)
    A = rng.standard_normal((1024, 1024), dtype=np.float32)
    q, state = fm.quantize_blockwise(A)
    assert q.dtype == np.uint8 and q.shape == A.shape and state.absmax.shape == (256,)
    assert np.abs(A - fm.dequantize_blockwise(q, state)).mean() < 0.011
    B = rng.random((1024, 1024), dtype=np.float32)
    q, state = fm.quantize_blockwise(B)
    err = np.abs(B - fm.dequantize_blockwise(q, state))
    assert err.mean() < 0.0033 and err.max() < 1e-2


def test_nearest_code_ties_go_to_the_lower_code():
    code = np.array([-1.0, 0.0, 1.0], np.float32)
    assert nearest_code(np.array([-0.5, 0.5, 0.5000001], np.float32), code).tolist() == [0, 1, 2]
