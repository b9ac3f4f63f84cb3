"""GPTQ's calibrated rounding (msbnb_pass.formats.gptq), checked against float64 numpy:

* on a layer whose inputs are strongly correlated, the calibrated codes give a clearly lower output error
  ``||X (W - Q)^T|| / ||X W^T||`` than round-to-nearest in every format (the error is recomputed here from
  ``X``, not taken from the module);
* the arrays are the round-to-nearest layout exactly (dtypes, shapes, state-dict keys, the double
  quantization's nested state), every code is one the format can hold, and they decode through the
  existing reference dequantizers to the values the algorithm chose;
* bad arguments raise with their exact messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from msbnb_pass import formats
from msbnb_pass.formats import gptq
from tests.bounds import gamma


def _layer(out_features=64, in_features=256, n=1024, seed=0):
    """Correlated inputs (a random mixing of few latent factors plus noise) and a Gaussian weight."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 32))
    mix = rng.standard_normal((32, in_features))
    x = (latent @ mix + 0.3 * rng.standard_normal((n, in_features))).astype(np.float32)
    w = (rng.standard_normal((out_features, in_features)) * 0.05).astype(np.float32)
    return x, w


def _out_err(x, w, q) -> float:
    x64 = x.astype(np.float64)
    ref = x64 @ w.astype(np.float64).T
    return float(np.linalg.norm(x64 @ q.astype(np.float64).T - ref) / np.linalg.norm(ref))


def _f32_rel(k: int) -> float:
    """Relative bound of an error computed from ``(W - Q) H (W - Q)^T`` in float32 (K-term sums, then a
    square root halves the relative error; the factor 8 covers H's conversion and the subtraction)."""
    return 8 * gamma(k + 2)


FOUR_BIT = [
    # quant_type, blocksize, double_quant, symmetric, in_features
    ("nf4", 64, True, True, 256),
    ("nf4", 64, False, True, 256),
    ("fp4", 64, True, True, 256),
    ("int4", 128, False, True, 256),
    ("int4", 64, True, False, 256),
    ("nf4", 64, True, True, 200),  # 200 % 64 != 0: blocks straddle rows, the last one is partial
]


@pytest.mark.parametrize("static", [False, True], ids=["in-order", "static-act-order"])
@pytest.mark.parametrize(("quant_type", "blocksize", "dq", "symmetric", "k"), FOUR_BIT)
def test_4bit_gptq_lowers_the_output_error_and_keeps_the_layout(quant_type, blocksize, dq, symmetric, k, static):
    x, w = _layer(in_features=k)
    h = x.T.astype(np.float64) @ x
    qz = gptq.Blockwise4bitQuantizer(w, quant_type, blocksize, dq, symmetric, static_groups=static)
    assert qz.column_free is static  # static groups: scales from the original weight, act order allowed
    res = gptq.gptq_quantize(w, h, qz)

    packed_rtn, state_rtn = formats.quantize_4bit(w, blocksize, quant_type, dq, symmetric=symmetric)
    rtn = formats.dequantize_4bit(packed_rtn, state_rtn)
    packed, state = res.arrays["packed"], res.arrays["quant_state"]
    deq = formats.dequantize_4bit(packed, state)  # the existing reference decoder
    np.testing.assert_array_equal(deq, res.dequantized)

    err_rtn, err_gptq = _out_err(x, w, rtn), _out_err(x, w, deq)
    assert err_gptq <= 0.8 * err_rtn, (err_gptq, err_rtn)
    # the module's own numbers (from X^T X, one float32 product of K terms) are these errors
    assert res.error_nearest == pytest.approx(err_rtn, rel=_f32_rel(k))
    assert res.error == pytest.approx(err_gptq, rel=_f32_rel(k))

    # same storage: dtypes, shapes, every state-dict key
    assert packed.dtype == packed_rtn.dtype and packed.shape == packed_rtn.shape
    sd, sd_rtn = state.to_state_dict("weight"), state_rtn.to_state_dict("weight")
    assert sd.keys() == sd_rtn.keys()
    for key in sd:
        assert (sd[key].dtype, sd[key].shape) == (sd_rtn[key].dtype, sd_rtn[key].shape), key
    np.testing.assert_array_equal(sd["weight.quant_map"], sd_rtn["weight.quant_map"])
    # valid codes: int4's symmetric table never uses nibble 0 (-8/7), and the codes the values decode from
    nibbles = formats.unpack_4bit(packed, w.size)
    if quant_type == "int4" and symmetric:
        assert nibbles.min() >= 1
    assert nibbles.max() <= 15
    absmax = np.repeat(state.dequantized_absmax(), blocksize)[: w.size]
    offset = 0 if state.block_offset is None else np.repeat(state.block_offset, blocksize)[: w.size]
    np.testing.assert_array_equal(deq.reshape(-1), (state.code[nibbles] * absmax + offset).astype(np.float32))
    if dq:
        # double quantization: the nested state is round-to-nearest's (offset and nested absmax), and the
        # codes were chosen against the absmax exactly as it decodes from the stored 8-bit codes
        assert state.absmax.dtype == np.uint8 and state.absmax.shape == state_rtn.absmax.shape
        np.testing.assert_array_equal(state.state2.absmax, state_rtn.state2.absmax)
        assert state.offset == state_rtn.offset
        np.testing.assert_array_equal(qz.scale, state.dequantized_absmax())
    else:
        assert state.absmax.dtype == np.float32 and state.absmax.shape == state_rtn.absmax.shape
    if static and quant_type != "int4":
        # static groups keep round-to-nearest's scales byte for byte (NF4/FP4 search none): only the nibbles differ
        np.testing.assert_array_equal(state.absmax, state_rtn.absmax)
        assert not np.array_equal(packed, packed_rtn)


def test_static_groups_with_act_order_beat_in_order_groups_on_outlier_columns():
    """Inputs with a few high-energy columns late in the row (as real activations have): visiting them
    first (act order, possible with static groups) gives a lower output error than the in-order loop."""
    x, w = _layer(in_features=256, seed=3)
    x[:, 200:208] *= 20.0
    h = x.T.astype(np.float64) @ x
    errs = {}
    for static in (False, True):
        qz = gptq.Blockwise4bitQuantizer(w, "int4", 128, False, True, static_groups=static)
        errs[static] = _out_err(x, w, gptq.gptq_quantize(w, h, qz).dequantized)
    assert errs[True] < 0.9 * errs[False], errs


@pytest.mark.parametrize(
    ("kind", "symmetric", "per_channel"),
    [("llm_int8", True, True), ("int8", True, True), ("int8", False, True), ("int8", True, False)],
)
def test_int8_gptq_lowers_the_output_error_and_keeps_the_layout(kind, symmetric, per_channel):
    x, w = _layer()
    h = x.T.astype(np.float64) @ x
    res = gptq.gptq_quantize(w, h, gptq.Int8Quantizer(w, kind, symmetric, per_channel))
    a = res.arrays
    if kind == "llm_int8":
        cb_rtn, scb_rtn = formats.int8_vectorwise_quant(w)
        rtn = formats.int8_vectorwise_dequant(cb_rtn, scb_rtn)
        deq = formats.int8_vectorwise_dequant(a["CB"], a["SCB"])
        assert a["CB"].dtype == np.int8 and a["CB"].shape == cb_rtn.shape
        np.testing.assert_array_equal(a["SCB"], scb_rtn)  # bitsandbytes' row absmax, unchanged
        assert np.abs(a["CB"].astype(int)).max() <= 127
    else:
        q_rtn, scale_rtn, off_rtn = formats.quantize_int8(w, symmetric, per_channel)
        rtn = formats.dequantize_int8(q_rtn, scale_rtn, off_rtn)
        deq = formats.dequantize_int8(a["q"], a["scale"], a["offset"])
        assert a["q"].dtype == np.int8 and a["q"].shape == q_rtn.shape
        np.testing.assert_array_equal(a["scale"], scale_rtn)
        if symmetric:
            assert a["offset"] is None and np.abs(a["q"].astype(int)).max() <= 127
    np.testing.assert_allclose(deq, res.dequantized, rtol=0, atol=0)
    err_rtn, err_gptq = _out_err(x, w, rtn), _out_err(x, w, deq)
    assert err_gptq <= 0.8 * err_rtn, (err_gptq, err_rtn)


def test_act_order_is_optional_for_int8_and_refused_for_blockwise_formats():
    x, w = _layer()
    h = x.T.astype(np.float64) @ x
    plain = gptq.gptq_quantize(w, h, gptq.Int8Quantizer(w), act_order=False)
    ordered = gptq.gptq_quantize(w, h, gptq.Int8Quantizer(w), act_order=True)
    assert ordered.error < plain.error_nearest and plain.error < plain.error_nearest
    with pytest.raises(ValueError) as exc:
        gptq.gptq_quantize(w, h, gptq.Blockwise4bitQuantizer(w), act_order=True)
    assert str(exc.value) == (
        "act_order needs scales that do not depend on the column order (int8); blockwise 4-bit formats tie "
        "their blocks to the column order"
    )


def test_dead_inputs_and_a_rank_deficient_hessian_still_quantize():
    """Columns the calibration never activates (zero rows/cols of H) and fewer rows than features."""
    x, w = _layer(n=48)
    x[:, :10] = 0.0
    h = x.T.astype(np.float64) @ x
    res = gptq.gptq_quantize(w, h, gptq.Blockwise4bitQuantizer(w, "nf4", 64, True))
    assert np.isfinite(res.dequantized).all()
    assert res.error < res.error_nearest


def test_bad_arguments_raise_with_exact_messages():
    x, w = _layer(in_features=128)
    h = x.T.astype(np.float64) @ x
    qz = gptq.Blockwise4bitQuantizer(w)
    with pytest.raises(ValueError) as exc:
        gptq.gptq_quantize(w, h[:64, :64], qz)
    assert str(exc.value) == "hessian must be [128, 128] for a weight of shape (64, 128), got (64, 64)"
    bad = h.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError) as exc:
        gptq.gptq_quantize(w, bad, qz)
    assert str(exc.value) == "hessian holds NaN or Inf (the calibration activations are not finite)"
    with pytest.raises(ValueError) as exc:
        gptq.gptq_quantize(w, h, qz, damp=0)
    assert str(exc.value) == "damp must be a float in (0, 1), got 0"
    with pytest.raises(ValueError) as exc:
        gptq.Blockwise4bitQuantizer(w, "nf5")
    assert str(exc.value) == "quant_type must be one of ('nf4', 'fp4', 'int4'), got 'nf5'"
    with pytest.raises(ValueError) as exc:
        gptq.Int8Quantizer(w, "int16")
    assert str(exc.value) == "kind must be 'llm_int8' or 'int8', got 'int16'"


def test_output_error_equals_the_direct_computation():
    x, w = _layer(in_features=64, n=200)
    q = w + np.float32(0.01) * np.sign(w)
    h = x.T.astype(np.float64) @ x
    assert gptq.output_error(w, q, h) == pytest.approx(_out_err(x, w, q), rel=1e-9)
    assert gptq.output_error(w, w, h) == 0.0


def test_inverse_cholesky_factors_the_damped_inverse():
    x, _ = _layer(in_features=96, n=300)
    h = x.T.astype(np.float64) @ x
    h[5, :] = h[:, 5] = 0.0  # a dead input: its diagonal becomes 1 before damping
    u = gptq.inverse_cholesky(h, 0.01)
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    patched = h.copy()
    patched[5, 5] = 1.0
    damped = patched + 0.01 * np.mean(np.diag(patched)) * np.eye(96)
    inv = np.linalg.inv(damped)
    cond = np.linalg.cond(damped)
    np.testing.assert_allclose(u.T @ u, inv, rtol=0, atol=cond * 96 * 2.0**-52 * np.abs(inv).max())


def test_int4_scale_search_clips_some_blocks_and_lowers_the_error(monkeypatch):
    """int4's uniform levels: each block's stored scale is the best of absmax x SHRINKS (weighted by the
    Hessian diagonal); without the search (SHRINKS = (1.0,)) every scale is the block's absmax."""
    x, w = _layer()
    h = x.T.astype(np.float64) @ x
    searched = gptq.Blockwise4bitQuantizer(w, "int4", 128)
    res = gptq.gptq_quantize(w, h, searched)
    monkeypatch.setattr(gptq, "SHRINKS", (1.0,))
    plain = gptq.Blockwise4bitQuantizer(w, "int4", 128)
    res_plain = gptq.gptq_quantize(w, h, plain)
    assert res.error < 0.97 * res_plain.error, (res.error, res_plain.error)

    # with the search some blocks are clipped: their scale is well below round-to-nearest's absmax of the block
    rtn_absmax = formats.quantize_4bit(w, 128, "int4")[1].absmax
    assert (searched.scale < 0.9 * rtn_absmax).sum() >= 4
    assert (searched.scale > 0.7 * rtn_absmax).all()


@pytest.mark.parametrize(("quant_type", "blocksize", "dq", "symmetric", "k"), FOUR_BIT)
def test_the_compiled_batch_loop_chooses_the_same_codes_as_numpy(quant_type, blocksize, dq, symmetric, k):
    """kernels' gptq_batch runs the static-group loop with the same float32 operations in the same order
    (-ffp-contract=off): packed codes and scales byte for byte those of the numpy loop."""
    from msbnb_pass.kernels import _lib

    if not _lib.available():
        pytest.skip("the C++ kernel library is not built")
    x, w = _layer(in_features=k, seed=7)
    x[:, 3::17] *= 6.0  # some high-energy columns: act order visits them first
    h = x.T.astype(np.float64) @ x
    results = []
    for kernel in (None, _lib.gptq_batch):
        qz = gptq.Blockwise4bitQuantizer(w, quant_type, blocksize, dq, symmetric, static_groups=True)
        results.append(gptq.gptq_quantize(w, h, qz, batch_kernel=kernel))
    (a, b) = results
    np.testing.assert_array_equal(a.arrays["packed"], b.arrays["packed"])
    np.testing.assert_array_equal(a.dequantized, b.dequantized)
    sa, sb = a.arrays["quant_state"].to_state_dict("w"), b.arrays["quant_state"].to_state_dict("w")
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    assert a.error == b.error and a.error_nearest == b.error_nearest
