"""The decode-step kernels (msbnb_pass.kernels.decode_ops) against float64 oracles, on every instruction set.

Bounds (u = 2**-24, Higham's gamma_n = n u / (1 - n u)):

* RMSNorm: the mean of squares is summed in float64 and rounded once (relative error u), the reciprocal
  square root adds u/2 from it plus one rounding u, and the two products add u each: |y - y64| <= gamma_4
  |y64|. The residual add before it is one float32 addition: equal to numpy's float32 sum bit for bit.
* RoPE: ``x * cos + rotate_half(x) * sin`` as two float32 products and one sum, as the plain MindSpore ops
  compute it: equal bit for bit to numpy's float32 evaluation of the same expression.
* SwiGLU: ``g / (1 + exp(-g)) * u``: exp within 1 ulp (2u relative), the sum u (plus exp's error damped
  by e / (1 + e) <= 1), the division and the product u each: |y - y64| <= gamma_6 |y64|.
* float32 matmul: K products summed in float32 in some order: tests/bounds.py's matmul bound.
* attention: each score is a D-term float32 dot product times the scale, so its absolute error is at most
  E_s = gamma_{D+1} * scale * sum_i |q_i k_si|. A probability exp(s - max) / total then carries a relative
  error of at most rho = max_s (E_s + E_max + u |s - max|) + 2u from its own and the maximum's score, the
  subtraction and exp; normalising adds that of the total (gamma_S relative, plus rho) and the division
  u; the weighted sum of values gamma_S: |out - out64| <= (2 rho + gamma_{S+2}) * sum_s p_s |v_s| to first
  order (times 1.01 for the second-order terms).
* the fused 4-bit projections: bit for bit the outputs of the separate layers (the same kernel per weight).
"""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from msbnb_pass import Linear4bit
from msbnb_pass.kernels import _lib

from ..bounds import U32, assert_matmul_close, assert_within, gamma

pytestmark = pytest.mark.skipif(not _lib.available(), reason="kernel library not built")

ALL_ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture
def isa(request, ms_cpu):
    name = request.param
    if name not in _lib.supported_isas():
        pytest.skip(f"this CPU has no {name}")
    _lib.set_isa(name)
    yield name
    _lib.set_isa("auto")


@pytest.fixture(scope="module")
def d(ms_cpu):
    from msbnb_pass.kernels import decode_ops

    return decode_ops


def rms64(s: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    s64 = s.astype(np.float64)
    return s64 / np.sqrt((s64 * s64).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
def test_rms_norm_and_the_residual_add(d, isa):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 3, 576)) * rng.uniform(0.01, 30, (2, 3, 1))).astype(np.float32)
    h = rng.standard_normal((2, 3, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    eps = Tensor(np.array([1e-5], np.float32))
    y = d.rms_norm()(Tensor(x), Tensor(w), eps).asnumpy()
    ref = rms64(x, w, 1e-5)
    assert_within(y, ref, gamma(4) * np.abs(ref) + 1e-38, "RMSNorm")
    s, y2 = d.add_rms_norm()(Tensor(x), Tensor(h), Tensor(w), eps)
    assert np.array_equal(s.asnumpy(), x + h)  # one float32 addition
    ref2 = rms64(x + h, w, 1e-5)
    assert_within(y2.asnumpy(), ref2, gamma(4) * np.abs(ref2) + 1e-38, "RMSNorm after the add")


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
def test_rope_split_equals_the_float32_ops_bit_for_bit(d, isa):
    rng = np.random.default_rng(2)
    b, t, nh, nkv, hd = 2, 3, 6, 2, 16
    qkv = rng.standard_normal((b, t, (nh + 2 * nkv) * hd)).astype(np.float32)
    ang = rng.uniform(-50, 50, (b, t, hd)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    q, k, v = d.rope_split(nh, nkv)(Tensor(qkv), Tensor(cos), Tensor(sin), Tensor(np.array([nh, nkv], np.int64)))

    def heads(a, n):
        return a.reshape(b, t, n, hd).transpose(0, 2, 1, 3)

    def rope(a):
        rot = np.concatenate([-a[..., hd // 2 :], a[..., : hd // 2]], -1)
        return a * cos[:, None] + rot * sin[:, None]  # float32 ops, each correctly rounded

    assert np.array_equal(q.asnumpy(), rope(heads(qkv[..., : nh * hd], nh)))
    assert np.array_equal(k.asnumpy(), rope(heads(qkv[..., nh * hd : (nh + nkv) * hd], nkv)))
    assert np.array_equal(v.asnumpy(), heads(qkv[..., (nh + nkv) * hd :], nkv))


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
def test_swiglu(d, isa):
    gu = (np.random.default_rng(3).standard_normal((3, 1, 2 * 300)) * 8).astype(np.float32)
    y = d.swiglu()(Tensor(gu)).asnumpy()
    g, u = gu[..., :300].astype(np.float64), gu[..., 300:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    assert y.shape == (3, 1, 300)
    assert_within(y, ref, gamma(6) * np.abs(ref) + 1e-38, "SwiGLU")


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize(("m", "sizes", "k"), [(1, (576, 192, 192), 576), (3, (70, 5), 33), (1, (1000,), 64)])
def test_linear_f32_concatenates_the_weights_products(d, isa, m, sizes, k):
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, 1, k)).astype(np.float32)
    ws = [(rng.standard_normal((n, k)) * 0.1).astype(np.float32) for n in sizes]
    y = d.linear_f32(len(ws))(Tensor(x), *[Tensor(w) for w in ws]).asnumpy()
    assert y.shape == (m, 1, sum(sizes))
    assert_matmul_close(y, x, np.concatenate(ws), what="linear_f32")


def test_linear_f32_does_not_depend_on_the_thread_count(d):
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((1, 1, 576)).astype(np.float32))
    w = Tensor(rng.standard_normal((4096, 576)).astype(np.float32))
    before = _lib.get_num_threads()
    try:
        _lib.set_num_threads(1)
        one = d.linear_f32(1)(x, w).asnumpy()
        _lib.set_num_threads(2)
        two = d.linear_f32(1)(x, w).asnumpy()
    finally:
        _lib.set_num_threads(before)
    assert np.array_equal(one, two)


def attention64(q, kc, vc, mask, scale):
    rep = q.shape[1] // kc.shape[1]
    k = np.repeat(kc.astype(np.float64), rep, 1)
    v = np.repeat(vc.astype(np.float64), rep, 1)
    hidden = mask[:, None] <= -1e29
    s = np.where(hidden, -np.inf, q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * scale + mask[:, None])
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)
    # the bound's ingredients
    d, n_slots = q.shape[-1], kc.shape[2]
    e = gamma(d + 1) * scale * (np.abs(q.astype(np.float64)) @ np.abs(k).transpose(0, 1, 3, 2))
    e = np.where(hidden, 0.0, e)
    e_max = np.take_along_axis(e, np.argmax(s, -1)[..., None], -1)
    rho = (np.where(hidden, 0.0, e + e_max + U32 * np.abs(s - mx))).max(-1, keepdims=True) + 2 * U32
    mag = (p @ np.abs(v)).transpose(0, 2, 1, 3).reshape(out.shape)
    rho = np.repeat(rho.transpose(0, 2, 1, 3), d, -1).reshape(out.shape)
    return out, 1.01 * (2 * rho + gamma(n_slots + 2)) * mag + 1e-38


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize(("b", "nh", "nkv", "t", "s", "hd"), [(1, 9, 3, 1, 128, 64), (2, 4, 2, 5, 64, 16)])
def test_cache_attention_against_float64(d, isa, b, nh, nkv, t, s, hd):
    rng = np.random.default_rng(s + t)
    q = (rng.standard_normal((b, nh, t, hd)) * 2).astype(np.float32)
    kc = (rng.standard_normal((b, nkv, s, hd)) * 2).astype(np.float32)
    vc = rng.standard_normal((b, nkv, s, hd)).astype(np.float32)
    mask = np.where(rng.random((b, t, s)) < 0.4, np.float32(-1e30), np.float32(0)).astype(np.float32)
    mask[..., 3] = 0  # every query sees at least one slot
    mask[..., -5:] = np.float32(-1e30)  # slots not written yet: hidden from every query
    scale = np.float32(hd**-0.5)
    out = d.cache_attention()(Tensor(q), Tensor(kc), Tensor(vc), Tensor(mask), Tensor(np.array([scale]))).asnumpy()
    ref, bound = attention64(q, kc, vc, mask, float(scale))
    assert out.shape == (b, t, nh * hd)
    assert_within(out, ref, bound, "attention over the cache")
    # a hidden slot is never read: garbage there changes nothing
    kc2, vc2 = kc.copy(), vc.copy()
    hidden_everywhere = (mask <= -1e29).all(axis=(0, 1))
    kc2[:, :, hidden_everywhere] = np.nan
    vc2[:, :, hidden_everywhere] = 1e30
    again = d.cache_attention()(Tensor(q), Tensor(kc2), Tensor(vc2), Tensor(mask), Tensor(np.array([scale])))
    assert hidden_everywhere.any() and np.array_equal(again.asnumpy(), out)


@pytest.mark.parametrize(
    ("b", "nh", "nkv", "t", "s", "hd"), [(1, 9, 3, 1, 203, 64), (2, 4, 2, 5, 64, 16), (1, 2, 1, 3, 9, 128)]
)
def test_cache_attention_gives_the_same_bits_on_every_instruction_set(d, b, nh, nkv, t, s, hd):
    """The AVX-512 attention (unmasked slots gathered, four dot products side by side, vector sums of v) does the
    generic loop's float operations in its order: the same bits."""
    rng = np.random.default_rng(s + hd)
    q = (rng.standard_normal((b, nh, t, hd)) * 2).astype(np.float32)
    kc = (rng.standard_normal((b, nkv, s, hd)) * 2).astype(np.float32)
    vc = rng.standard_normal((b, nkv, s, hd)).astype(np.float32)
    mask = np.where(rng.random((b, t, s)) < 0.3, np.float32(-1e30), np.float32(0)).astype(np.float32)
    mask[..., 0] = 0
    args = [Tensor(a) for a in (q, kc, vc, mask, np.array([hd**-0.5], np.float32))]
    outs = []
    try:
        for name in _lib.supported_isas():
            _lib.set_isa(name)
            outs.append(d.cache_attention()(*args).asnumpy())
    finally:
        _lib.set_isa("auto")
    assert len(outs) >= 2 and all(np.array_equal(o, outs[0]) for o in outs)


W4_KINDS = {
    "nf4-dq": dict(quant_type="nf4", blocksize=64, compress_statistics=True),
    "q4_1-like": dict(quant_type="int4", blocksize=32, compress_statistics=False, symmetric=False),
}


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("kind", sorted(W4_KINDS))
@pytest.mark.parametrize("m", [1, 3])
def test_fused_4bit_projections_equal_the_separate_layers_bit_for_bit(d, isa, kind, m):

    rng = np.random.default_rng(m)
    k = 576
    layers = [
        Linear4bit(
            k,
            n,
            bias=n == 192,
            weight=(rng.standard_normal((n, k)) * 0.05).astype(np.float32),
            bias_value=rng.standard_normal(n).astype(np.float32) if n == 192 else None,
            **W4_KINDS[kind],
        )
        for n in (576, 192, 64)
    ]
    x = Tensor(rng.standard_normal((m, 1, k)).astype(np.float32))
    args = [a for layer in layers for a in d.w4_args(layer)]
    fused = d.linear4bit_multi(3)(x, *args).asnumpy()
    separate = np.concatenate([layer(x).asnumpy() for layer in layers], -1)
    assert fused.shape == (m, 1, 832)
    assert np.array_equal(fused, separate)


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("m", [1, 3])
def test_fused_4bit_projections_keep_each_layers_compute_mode(d, isa, m):
    """One projection per compute mode (float32, bfloat16, int8) in one call: each slice equals its layer."""

    rng = np.random.default_rng(10 + m)
    k = 576
    layers = [
        Linear4bit(
            k,
            n,
            bias=False,
            weight=(rng.standard_normal((n, k)) * 0.05).astype(np.float32),
            compute_dtype=cd,
            **W4_KINDS["nf4-dq"],
        )
        for n, cd in ((192, "float32"), (200, "bfloat16"), (64, "int8"))
    ]
    x = Tensor(rng.standard_normal((m, 1, k)).astype(np.float32))
    args = [a for layer in layers for a in d.w4_args(layer)]
    fused = d.linear4bit_multi(3)(x, *args).asnumpy()
    separate = [layer(x).asnumpy() for layer in layers]
    assert np.array_equal(fused, np.concatenate(separate, -1))


def test_bad_calls_fail_with_the_kernels_message(d):
    with pytest.raises(ValueError, match="linear_f32 takes 1 to 8 weights, got 9"):
        d.linear_f32(9)
    with pytest.raises(ValueError, match="linear4bit_multi takes 1 to 8 projections, got 0"):
        d.linear4bit_multi(0)


def q8_matrix(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q8_0-style weight: fp16 scales per 32, int8 codes in [-127, 127] with a +-127 in every block."""
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    q[:, ::32] = 127 * rng.choice(np.array([-1, 1], np.int8), (n, k // 32))
    d = rng.uniform(1e-4, 1e-2, (n, k // 32)).astype(np.float16).astype(np.float32)
    return q, d, (q.reshape(n, -1, 32).astype(np.float32) * d[..., None]).reshape(n, k)


def test_lossless_q8_recovers_the_codes_or_refuses():
    from msbnb_pass.models.generation import lossless_q8

    rng = np.random.default_rng(5)
    q, d, w = q8_matrix(rng, 40, 96)
    w[3, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    q[3, 32:64], d[3, 1] = 0, 0.0
    got = lossless_q8(w)
    assert got is not None and np.array_equal(got[0], q) and np.array_equal(got[1], d)
    assert lossless_q8(rng.standard_normal((40, 96)).astype(np.float32)) is None  # not int8 x scale
    assert lossless_q8(w[:, :80]) is None  # K not a multiple of 32


@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("m", [1, 2])
def test_linear_q8_equals_the_float_weights_product(d, isa, m):
    rng = np.random.default_rng(6 + m)
    q, s, w = q8_matrix(rng, 1000, 576)
    x = rng.standard_normal((m, 1, 576)).astype(np.float32)
    y = d.linear_q8()(Tensor(x), Tensor(q), Tensor(s)).asnumpy()
    assert y.shape == (m, 1, 1000)
    assert_matmul_close(y, x, w, what="int8 x scale head")  # q * s is w exactly: the float32 bound holds


def test_linear_q8_gives_the_same_bits_on_every_instruction_set(d):
    q, s, _ = q8_matrix(np.random.default_rng(9), 302, 576)  # 4-row groups and 2 rows left
    x = Tensor(np.random.default_rng(10).standard_normal((1, 576)).astype(np.float32))
    outs = []
    try:
        for name in _lib.supported_isas():
            _lib.set_isa(name)
            outs.append(d.linear_q8()(x, Tensor(q), Tensor(s)).asnumpy())
    finally:
        _lib.set_isa("auto")
    assert len(outs) >= 2 and all(np.array_equal(o, outs[0]) for o in outs)
