"""The reduced-precision compute modes of the 4-bit and weight-only INT8 layers: ``compute_dtype="bfloat16"``
and the opt-in ``compute_dtype="int8"`` (W4A8 / W8A8).

bfloat16 bound. The kernels round x and the decoded weights W to bfloat16 (round to nearest even, unit
roundoff u_b = 2^-8), multiply exactly and sum K products in float32 (u = 2^-24). Against the float64
product of the *rounded* operands x_b, W_b (``kernel_reference``) Higham's bound holds,
``|y - x_b W_b^T| <= gamma_(K+3) * |x_b| @ |W_b|^T`` with gamma_n = n u / (1 - n u). Against the exact
float64 product of the unrounded operands, ``x_b w_b = x w (1 + d1)(1 + d2)`` with |d_i| <= 2^-8, so
``|y - x W^T| <= (2^-7 + 2^-16 + gamma_(K+3) (1 + 2^-8)^2) * |x| @ |W|^T`` (plus u |y| for the bias add;
operands below 2^-126 would read as zero and add 2^-126 |W| each: none occur here).

int8 bound. x is quantized per row and block (scale s_x = a/127 with a the block's absmax), W as int8 levels
with a float32 scale per row and block (4-bit: level = rint(127 code), s_w = absmax/127; INT8: the codes
themselves with the row scale). The integer block sums are exact and combined in float32: against their
exact value (``kernel_reference``), ``|y - y_q| <= gamma_(nb+2) * sum_b |dot_b s_b|``. Against the float64
product with the dequantized weights, per element the activation error is
``|x_hat - x| <= a (1/254 + 2^-21)`` (rint, plus float32 rounding of 127/a, of x * (127/a) and of a/127) and
the weight error is ``|w_hat - w| <= absmax (1/254 + 2^-21)`` for 4-bit (the code rounding |lv - 127 code|
<= 1/2, plus float32 rounding of the scale and of the decoded weight) and ``2^-23 |w|`` for INT8, so
``|y - x W^T| <= E_x @ (|W| + E_w)^T + |x| @ E_w^T + (gamma_(nb+2) + u) * sum_b |dot_b s_b| (+ u |y|)``.

Measured on a random 4096x4096 layer (N(0, 0.02^2) weights, N(0, 1) inputs, M = 32), error against the
float64 product with the layer's dequantized weights (relative RMS ||y - y64|| / ||y64||, and the largest
|y - y64| / (|x| @ |W|^T)):

    NF4+DQ  float32   1.5e-07   1.8e-08
    NF4+DQ  bfloat16  2.4e-03   2.8e-04
    NF4+DQ  int8      8.5e-03   9.4e-04
    INT8    bfloat16  2.4e-03   3.0e-04
    INT8    int8      6.5e-03   6.8e-04

next to the 4-bit quantization error itself (relative RMS 0.092 for NF4, 0.0086 for INT8, against the
float weights): bf16 compute adds nothing visible to a 4-bit layer, int8 compute adds ~0.5% to NF4.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msbnb_pass import BitsAndBytesConfig, Int4Config, Int8Config, Linear4bit, Linear8bit, kernels
from msbnb_pass.formats import compute
from msbnb_pass.kernels import _lib

CPU = _lib.available()
ISAS = _lib.supported_isas() if CPU else []
BACKENDS = ["cpu", "reference"] if CPU else ["reference"]
U = 2.0**-24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def make(kind: str, n: int, k: int, compute_dtype, backend: str = "cpu", seed: int = 0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    common = dict(weight=W, bias_value=b, backend=backend, compute_dtype=compute_dtype)
    if kind == "nf4-dq-64":
        return Linear4bit(k, n, True, "nf4", 64, True, **common)
    if kind == "fp4-128":
        return Linear4bit(k, n, True, "fp4", 128, False, **common)
    if kind == "int4-32":
        return Linear4bit(k, n, True, "int4", 32, False, **common)
    if kind == "int4-asym-32":
        return Linear4bit(k, n, True, "int4", 32, False, symmetric=False, **common)
    if kind == "int8":
        return Linear8bit(k, n, True, has_fp16_weights=False, **common)
    if kind == "int8-asym-tensor":
        return Linear8bit(k, n, True, has_fp16_weights=False, symmetric=False, per_channel=False, **common)
    raise ValueError(kind)


def isa_params():
    return [pytest.param(isa, id=isa) for isa in ISAS]


@pytest.fixture
def isa(request):
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa("auto")
    kernels.set_bf16_native(True)
    kernels.set_amx(True)


def check_against_kernel_reference(layer, x: np.ndarray) -> np.ndarray:
    y = layer(Tensor(x)).asnumpy().astype(np.float64).reshape(-1, layer.out_features)
    ref, bound = layer.kernel_reference(x)
    ref = ref + layer.bias.asnumpy()
    bound = bound + np.abs(ref) * U
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"worst ratio {(err / bound).max():.3g}"
    return y


# ---- bfloat16 -----------------------------------------------------------------------------------------------------
BF16_KINDS = ["nf4-dq-64", "fp4-128", "int4-asym-32", "int8", "int8-asym-tensor"]
# (N, K, M): fused-size and panel-size M, unaligned K (blocks straddling rows, K not a multiple of 32); M = 1 is
# the decode GEMV on AVX-512, with K % 128 == 64 (a last half chunk: 576, 1088) and 17 blocks per row; int8 with
# K = 1030: two panel chunks, the last ending inside a 32-element step
BF16_SHAPES = [(40, 256, 1), (36, 512, 7), (20, 70, 5), (24, 1536, 3), (23, 576, 1), (37, 1088, 1), (21, 1030, 1)]


def bf16_bound_vs_exact(x: np.ndarray, W: np.ndarray, y: np.ndarray) -> np.ndarray:
    K = x.shape[-1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(W.astype(np.float64)).T
    return (2.0**-7 + 2.0**-16 + gamma(K + 3) * (1 + 2.0**-8) ** 2) * mag + np.abs(y) * U + 1e-30


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize("kind", BF16_KINDS)
@pytest.mark.parametrize(("n", "k", "m"), BF16_SHAPES)
def test_bf16_kernel(ms_cpu, isa, kind, n, k, m):
    layer = make(kind, n, k, "bfloat16")
    x = np.random.default_rng(k + m).standard_normal((m, k)).astype(np.float32)
    y = check_against_kernel_reference(layer, x)
    W, b = layer.dequantized_weight(), layer.bias.asnumpy()
    exact = x.astype(np.float64) @ W.astype(np.float64).T + b
    assert np.all(np.abs(y - exact) <= bf16_bound_vs_exact(x, W, exact))
    if isa == "avx512" and _lib.cpu_has_bf16():  # vdpbf16ps and its emulation: the same bits
        kernels.set_amx(False)  # AMX tiles (batches on CPUs that have them) sum in their own order
        kernels.set_bf16_native(True)
        assert _lib.bf16_native()
        native = layer(Tensor(x)).asnumpy()
        kernels.set_bf16_native(False)
        assert not _lib.bf16_native()
        emulated = layer(Tensor(x)).asnumpy()
        np.testing.assert_array_equal(native, emulated)


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize("kind", ["int8", "int8-asym-tensor"])
@pytest.mark.parametrize("k", [1030, 2048])
def test_bf16_int8_one_row_equals_its_row_in_a_batch(ms_cpu, isa, kind, k):
    """INT8 with bf16 compute: one row of x (a GEMV without a panel on AVX-512) gives the bits that the same row
    gets inside a batch (the panel GEMM), natively and emulated."""
    layer = make(kind, 37, k, "bfloat16")
    x = np.random.default_rng(k).standard_normal((3, k)).astype(np.float32)
    kernels.set_amx(False)  # AMX tiles (batches on CPUs that have them) sum in their own order
    for native in [True, False] if isa == "avx512" and _lib.cpu_has_bf16() else [False]:
        kernels.set_bf16_native(native)
        batch = layer(Tensor(x)).asnumpy()
        for i in range(3):
            np.testing.assert_array_equal(layer(Tensor(x[i : i + 1])).asnumpy()[0], batch[i])


# (N, K, M) for the AMX tiles (batches of 8 rows or more): M below, at and across the 16- and 32-row tiles, N
# across the 32-row panel pairs and the tasks (up to 128 rows), K unaligned and over several decode chunks (1024)
AMX_SHAPES = [(40, 256, 8), (33, 70, 17), (200, 512, 33), (31, 1536, 64), (130, 2112, 9)]


@pytest.mark.skipif(
    not (CPU and "bfloat16" in _lib.cpu_has_amx()),
    reason="this CPU has no AMX bf16 tiles (or Linux does not grant them)",
)
@pytest.mark.parametrize("kind", BF16_KINDS)
@pytest.mark.parametrize(("n", "k", "m"), AMX_SHAPES)
def test_bf16_amx_tiles(ms_cpu, kind, n, k, m):
    """bfloat16 batches on AMX tiles: the same rounded operands as the vector path, each output summed by the tile
    unit. Its accumulation is not round-to-nearest at every step (measured), so the float32 part of the bound is
    taken with twice the unit roundoff: |y - x_b W_b^T| <= gamma'_(K+3) |x_b| @ |W_b|^T, u' = 2^-23."""
    kernels.set_isa("avx512")
    try:
        layer = make(kind, n, k, "bfloat16")
        x = np.random.default_rng(k + m).standard_normal((m, k)).astype(np.float32)
        kernels.set_amx(True)
        assert "bfloat16" in _lib.amx()
        y = layer(Tensor(x)).asnumpy().astype(np.float64)
        ref, bound = layer.kernel_reference(x)
        ref = ref + layer.bias.asnumpy()
        err = np.abs(y - ref)
        assert np.all(err <= 2 * bound + np.abs(ref) * U), f"worst ratio {(err / (2 * bound)).max():.3g}"
        kernels.set_amx(False)
        assert not _lib.amx()
        vector = layer(Tensor(x)).asnumpy().astype(np.float64)
        assert np.all(np.abs(vector - ref) <= bound + np.abs(ref) * U)
        # each output depends only on its own row of x: the rows in another batch (reversed) give the same bits
        kernels.set_amx(True)
        rows = np.arange(m)[::-1][:8]
        np.testing.assert_array_equal(layer(Tensor(x[rows])).asnumpy(), y[rows].astype(np.float32))
        with pytest.raises(TypeError, match="set_amx takes a bool, got 1"):
            kernels.set_amx(1)
    finally:
        kernels.set_amx(True)
        kernels.set_isa("auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_keeps_input_dtype_and_reference_backend(ms_cpu, backend):
    layer = make("nf4-dq-64", 24, 128, ms.bfloat16, backend)
    assert layer.compute_dtype_name == "bfloat16" and layer.compute_mode == "bfloat16"
    x = np.random.default_rng(1).standard_normal((3, 2, 128)).astype(np.float32)
    check_against_kernel_reference(layer, x)
    y16 = layer(Tensor(x.astype(np.float16)))
    assert y16.dtype == ms.float16 and y16.shape == (3, 2, 24)
    assert layer(Tensor(x)).dtype == ms.float32


def test_bf16_round_oracle():
    """The numpy rounding used as the oracle: ties to even, NaN/Inf kept, denormals to signed zero."""
    a = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-9), 1e-39, -1e-39, np.nan, 3.4e38, -np.inf], np.float32)
    r = compute.bf16_round(a)
    assert r[0] == 1.0 and r[1] == 1 + 4 * 2**-8 and r[2] == -1.0
    assert r[3] == 0 and r[4] == 0 and np.signbit(r[4])
    assert np.isnan(r[5]) and r[6] == np.inf and r[7] == -np.inf


# ---- int8 -------------------------------------------------------------------------------------------------------
INT8_KINDS = ["nf4-dq-64", "fp4-128", "int4-32", "int8"]
# K=200: INT8 only; M = 1 with K = 2048 and 1088 (32 and 17 blocks of 64 per row: the decode GEMV's scales are
# decoded 16 blocks at a time, and with 17 a group straddles rows and nested blocks); K = 192 with INT8's blocks
# of 128: a last block of 64 (AMX tiles take whole 64-element steps)
INT8_SHAPES = [
    (40, 256, 1),
    (36, 512, 17),
    (20, 384, 70),
    (8, 200, 3),
    (12, 128, 300),
    (20, 2048, 1),
    (37, 1088, 1),
    (33, 192, 9),
]
INT8_BLOCK = {"nf4-dq-64": 64, "fp4-128": 128, "int4-32": 32, "int8": 1}


def int8_bound_vs_exact(layer, x: np.ndarray) -> np.ndarray:
    """E_x @ (|W| + E_w)^T + |x| @ E_w^T + (gamma_(nb+2) + u) * mag (see the module docstring)."""
    x2 = x.astype(np.float32).reshape(-1, layer.in_features)
    levels, wscale, block = layer._int8_operands(np.arange(layer.out_features))
    _, sx = compute.quantize_activations(x2, block)
    amax = (sx.astype(np.float64) * 127.0).repeat(block, axis=1)[:, : layer.in_features]
    e_x = amax * (1 / 254 + 2.0**-21)
    W = np.abs(layer.dequantized_weight().astype(np.float64))
    if isinstance(layer, Linear4bit):
        absmax = (wscale.astype(np.float64) * 127.0).repeat(block, axis=1)
        e_w = absmax * (1 / 254 + 2.0**-21)
    else:
        e_w = W * 2.0**-23
    _, mag = compute.int8_matmul(x2, levels, wscale, block)
    nb = wscale.shape[1]
    return e_x @ (W + e_w).T + np.abs(x2.astype(np.float64)) @ e_w.T + (gamma(nb + 2) + U) * mag


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize(
    ("kind", "n", "k", "m"),
    # 4-bit int8 compute needs in_features to be a multiple of the blocksize (refused otherwise, tested below)
    [(kind, *shape) for kind in INT8_KINDS for shape in INT8_SHAPES if shape[1] % INT8_BLOCK[kind] == 0],
)
def test_int8_kernel_all_isas_identical(ms_cpu, kind, n, k, m):
    layer = make(kind, n, k, "int8")
    x = np.random.default_rng(k + m).standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= 20.0  # an outlier feature: only its block's activation scale grows
    outputs = []
    try:
        for name in ISAS:
            kernels.set_isa(name)
            outputs.append(check_against_kernel_reference(layer, x))
    finally:
        kernels.set_isa("auto")
    for other in outputs[1:]:  # integer sums are exact and the float steps identical: the same bits
        np.testing.assert_array_equal(outputs[0], other)
    W, b = layer.dequantized_weight(), layer.bias.asnumpy()
    exact = x.astype(np.float64) @ W.astype(np.float64).T + b
    bound = int8_bound_vs_exact(layer, x) + np.abs(exact) * U + 1e-30
    assert np.all(np.abs(outputs[0] - exact) <= bound), f"worst ratio {(np.abs(outputs[0] - exact) / bound).max()}"


@pytest.mark.skipif(
    not (CPU and "int8" in _lib.cpu_has_amx()), reason="this CPU has no AMX int8 tiles (or Linux does not grant them)"
)
@pytest.mark.parametrize(
    ("kind", "n", "k", "m"),
    [
        (kind, *shape)
        for kind in ["nf4-dq-64", "fp4-128", "int8"]
        for shape in [(36, 512, 17), (33, 192, 9), (130, 1024, 5), (20, 384, 130)]
        if shape[1] % INT8_BLOCK[kind] == 0
    ],
)
def test_int8_amx_tiles_same_bits(ms_cpu, kind, n, k, m):
    """int8 compute on AMX tiles (batches of 5+ rows): exact integer block sums and the same float steps, so the
    same bits as the vector path."""
    layer = make(kind, n, k, "int8")
    x = np.random.default_rng(k + m).standard_normal((m, k)).astype(np.float32)
    x[:, 5] *= 30.0
    kernels.set_isa("avx512")
    try:
        kernels.set_amx(True)
        assert "int8" in _lib.amx()
        tiles = check_against_kernel_reference(layer, x)
        kernels.set_amx(False)
        assert "int8" not in _lib.amx()
        np.testing.assert_array_equal(tiles, layer(Tensor(x)).asnumpy().astype(np.float64))
    finally:
        kernels.set_amx(True)
        kernels.set_isa("auto")


@pytest.mark.parametrize("kind", ["nf4-dq-64", "int8"])
def test_int8_reference_backend(ms_cpu, kind):
    layer = make(kind, 24, 256, "int8", "reference")
    x = np.random.default_rng(2).standard_normal((2, 3, 256)).astype(np.float32)
    check_against_kernel_reference(layer, x)


def test_int8_quantize_activations_oracle():
    x = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.25, 2.0]], np.float32)
    q, s = compute.quantize_activations(x, 4)
    assert q.tolist() == [[0, 0, 0, 0, 64, -32, 16, 127]] and s.tolist() == [[0.0, np.float32(2.0) / np.float32(127)]]


def test_int8_refusals_name_the_layer():
    w = np.zeros((8, 96), np.float32)
    with pytest.raises(ValueError, match=r"fc1: compute_dtype='int8' needs in_features \(96\) to be a multiple"):
        Linear4bit(96, 8, weight=w, blocksize=64, compute_dtype="int8", layer_name="fc1")
    with pytest.raises(ValueError, match="fc2: compute_dtype='int8' needs a symmetric code"):
        Linear4bit(128, 8, quant_type="int4", symmetric=False, compute_dtype="int8", layer_name="fc2")
    with pytest.raises(ValueError, match="fc3: compute_dtype='int8' needs a symmetric int8 weight"):
        Linear8bit(128, 8, has_fp16_weights=False, symmetric=False, compute_dtype="int8", layer_name="fc3")
    with pytest.raises(ValueError, match=r"fc4: compute_dtype must be one of .*'int8'\), got 'int4'"):
        Linear8bit(128, 8, compute_dtype="int4", layer_name="fc4")


# ---- graph mode, gradients, configs ----------------------------------------------------------------------------------
def input_gradient(layer, dy: np.ndarray, k: int) -> np.ndarray:
    x = Tensor(np.zeros((dy.shape[0], k), np.float32))
    return ms.grad(lambda t: (layer(t) * Tensor(dy)).sum())(x).asnumpy()


def bf16_dx_reference(layer, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dx = bf16(dy) @ bf16(W) in float64 and Higham's bound for its float32 sums of N products."""
    g = compute.bf16_round(dy).astype(np.float64)
    Wb = compute.bf16_round(layer.dequantized_weight()).astype(np.float64)
    n = dy.shape[1]
    return g @ Wb, gamma(n + 3) * (np.abs(g) @ np.abs(Wb)) + 1e-30


@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_jit_matches_pynative_and_the_backward_of_each_mode(ms_cpu, mode):
    layer = make("nf4-dq-64", 32, 128, mode, BACKENDS[0])
    x = np.random.default_rng(4).standard_normal((5, 128)).astype(np.float32)
    eager = layer(Tensor(x)).asnumpy()

    @ms.jit
    def run(inp):
        return layer(inp)

    np.testing.assert_array_equal(run(Tensor(x)).asnumpy(), eager)
    g = np.random.default_rng(5).standard_normal((5, 32)).astype(np.float32)
    dx = input_gradient(layer, g, 128)
    if mode == "bfloat16":  # dy and W rounded to bf16, float32 sums, as bitsandbytes' backward in its compute dtype
        want, bound = bf16_dx_reference(layer, g)
    else:  # int8 compute: the float32 input gradient dy @ W (weights frozen)
        W = layer.dequantized_weight().astype(np.float64)
        want = g.astype(np.float64) @ W
        bound = gamma(32 + 3) * (np.abs(g.astype(np.float64)) @ np.abs(W)) + 1e-30
    assert np.all(np.abs(dx - want) <= bound)


# (N, K, M) of the bf16 input gradient: N odd (a last zero pair) and across the 64-row panels, K unaligned (the
# scalar and one-vector tails of a slice) or over several slices, M below and across the register tiles
BF16_DX_SHAPES = [(40, 130, 6), (151, 650, 13), (24, 2304, 3), (7, 64, 1)]


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize("kind", ["nf4-dq-64", "int4-asym-32", "int8", "int8-asym-tensor"])
@pytest.mark.parametrize(("n", "k", "m"), BF16_DX_SHAPES)
def test_bf16_input_gradient(ms_cpu, isa, kind, n, k, m):
    """The bfloat16 mode's dx kernel against the float64 product of the rounded operands, and vdpbf16ps against
    its emulation (the same bits) on AVX-512."""
    layer = make(kind, n, k, "bfloat16", seed=n)
    dy = np.random.default_rng(k + m).standard_normal((m, n)).astype(np.float32)
    kernels.set_amx(False)  # AMX tiles (batches on CPUs that have them) sum in their own order
    dx = input_gradient(layer, dy, k)
    want, bound = bf16_dx_reference(layer, dy)
    assert np.all(np.abs(dx - want) <= bound), f"worst ratio {(np.abs(dx - want) / bound).max():.3g}"
    # the float gradient differs by the operands' rounding: about 2^-8 relative, far more than the bound above
    W = layer.dequantized_weight().astype(np.float64)
    assert np.abs(dx - dy.astype(np.float64) @ W).max() > 10 * bound.max()
    if isa == "avx512" and _lib.cpu_has_bf16():
        kernels.set_bf16_native(False)
        np.testing.assert_array_equal(input_gradient(layer, dy, k), dx)


@pytest.mark.skipif(
    not (CPU and "bfloat16" in _lib.cpu_has_amx()),
    reason="this CPU has no AMX bf16 tiles (or Linux does not grant them)",
)
@pytest.mark.parametrize("kind", ["nf4-dq-64", "int4-asym-32", "int8"])
@pytest.mark.parametrize(("n", "k", "m"), [(151, 650, 37), (64, 1024, 8), (33, 2112, 70)])
def test_bf16_input_gradient_on_amx_tiles(ms_cpu, kind, n, k, m):
    """Batches of 8 rows of dy or more on the tiles: within the bound taken with twice the unit roundoff (as the
    forward's tiles), and each row of dx independent of the other rows of the batch."""
    kernels.set_isa("avx512")
    try:
        layer = make(kind, n, k, "bfloat16", seed=n)
        dy = np.random.default_rng(k + m).standard_normal((m, n)).astype(np.float32)
        kernels.set_amx(True)
        dx = input_gradient(layer, dy, k)
        want, bound = bf16_dx_reference(layer, dy)
        assert np.all(np.abs(dx - want) <= 2 * bound), f"worst ratio {(np.abs(dx - want) / (2 * bound)).max():.3g}"
        rows = np.arange(m)[::-1][:8]
        np.testing.assert_array_equal(input_gradient(layer, dy[rows], k), dx[rows])
    finally:
        kernels.set_amx(True)
        kernels.set_isa("auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nf4-dq-64", "int8"])
@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_reference_backend_has_the_kernels_backward(ms_cpu, backend, kind, mode):
    """Both backends give the same input gradient semantics (the reference's autodiff through the int8 mode's
    rounding would give zero, through the bf16 casts a rounded result)."""
    layer = make(kind, 24, 128, mode, backend)
    dy = np.random.default_rng(2).standard_normal((5, 24)).astype(np.float32)
    dx = input_gradient(layer, dy, 128)
    if mode == "bfloat16":
        want, bound = bf16_dx_reference(layer, dy)
    else:
        W = layer.dequantized_weight().astype(np.float64)
        want = dy.astype(np.float64) @ W
        bound = gamma(24 + 3) * (np.abs(dy.astype(np.float64)) @ np.abs(W)) + 1e-30
    assert np.all(np.abs(dx - want) <= bound)


def test_from_dense_and_configs_choose_the_compute(ms_cpu):
    import msbnb_pass as mb

    dense = nn.Dense(128, 16)
    assert Linear4bit.from_dense(dense, compute_dtype="bfloat16").compute_mode == "bfloat16"
    assert Linear8bit.from_dense(dense, compute_dtype="int8").compute_mode == "int8"

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc = nn.Dense(128, 64)

        def construct(self, x):
            return self.fc(x)

    cases = [
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="torch.bfloat16"), Linear4bit, "bfloat16"),
        (Int4Config(quant_type="nf4", group_size=64, compute_dtype="int8"), Linear4bit, "int8"),
        (Int8Config(compute_dtype="bfloat16"), Linear8bit, "bfloat16"),
        (Int8Config(compute_dtype="int8"), Linear8bit, "int8"),
    ]
    for config, cls, mode in cases:
        net = Net()
        result = mb.quantize(net, config, sample_inputs=(Tensor(np.ones((2, 128), np.float32)),))
        assert isinstance(net.fc, cls) and net.fc.compute_mode == mode, (config, type(net.fc))
        assert result.report.passed
    with pytest.raises(ValueError, match="LLM.int8.*compute_dtype must be 'float32', got 'bfloat16'"):
        Int8Config(threshold=6.0, compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="compute_dtype='int8' needs symmetric=True"):
        Int4Config(symmetric=False, compute_dtype="int8")


# ---- the float32 kernels' wide paths (M >= 16: rows of x in the vector lanes; dx register blocks) ------------------
@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize(
    ("kind", "n", "k"),
    [("nf4-dq-64", 20, 128), ("int4-32", 36, 70), ("int8", 20, 301), ("nf4-dq-64", 1000, 640), ("int8", 20, 16500)],
)
def test_float32_wide_paths(ms_cpu, isa, kind, n, k):
    """M = 300 crosses the 256-row block of the wide GEMM and ends in partial tiles; N = 20/36 ends in partial
    groups of weight rows; N = 1000, K = 640: tasks of several weight panels (the last one partial) over three
    k-chunks; K = 16500: one 256-row block per pass (the transposed x is bounded). Forward and dx within Higham's
    bound gamma_(K+3) (resp. gamma_(N+3)) * |a| @ |b|."""
    layer = make(kind, n, k, "float32")
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((300, k)).astype(np.float32)
    check_against_kernel_reference(layer, x)
    g = rng.standard_normal((300, n)).astype(np.float32)
    gt = Tensor(g)
    dx = ms.grad(lambda xx: (layer(xx) * gt).sum())(Tensor(x)).asnumpy()
    W = layer.dequantized_weight().astype(np.float64)
    want = g.astype(np.float64) @ W
    bound = gamma(n + 3) * (np.abs(g.astype(np.float64)) @ np.abs(W)) + 1e-30
    assert np.all(np.abs(dx - want) <= bound)
