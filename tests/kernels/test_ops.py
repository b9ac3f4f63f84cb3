"""The fused kernels against the float64 oracle: every format, shape class, instruction set and execution mode.

Bound (fp32 rounding, tests/bounds.py): every kernel sums K products in float32 in some order, so with
u = 2**-24, |y - x @ W_deq^T - b| <= gamma_{K+2} * (|x| @ |W_deq|^T + |b|), where W_deq are the oracle's
dequantized weights (bit-identical to what the kernels decode) [Higham, Accuracy and Stability of Numerical
Algorithms, 3.1]. The extra 2 cover the NF4 path that scales partial sums by the block absmax after
multiplying the code with x, and the bias add. LLM.int8() sums its int8 products exactly, so it is checked
against the numpy oracle of the same decomposition instead (only its outlier columns are a float sum).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from msbnb_pass import Linear4bit, Linear8bit, Linear8bitLt
from msbnb_pass import formats as fm
from msbnb_pass.kernels import _lib

from ..bounds import U16, U32, assert_matmul_close, assert_within, matmul_bound

BACKENDS = ["cpu", "reference"] if _lib.available() else ["reference"]
needs_lib = pytest.mark.skipif(not _lib.available(), reason="kernel library not built")


def make(kind: str, n: int, k: int, backend: str, seed: int = 0, bias: bool = True):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    common = dict(weight=W, bias_value=b, backend=backend)
    if kind.startswith("4bit"):
        _, qt, bs, dq, sym = kind.split("-")
        return Linear4bit(k, n, bias, qt, int(bs), dq == "dq", symmetric=sym == "sym", **common)
    if kind == "int8":
        return Linear8bit(k, n, bias, has_fp16_weights=False, **common)
    if kind == "int8-asym-tensor":
        return Linear8bit(k, n, bias, has_fp16_weights=False, symmetric=False, per_channel=False, **common)
    if kind.startswith("llm_int8"):
        return Linear8bitLt(k, n, bias, threshold=float(kind.split("-")[1]), **common)
    raise ValueError(kind)


KINDS_4BIT = [
    "4bit-nf4-64-dq-sym",
    "4bit-fp4-64-plain-sym",
    "4bit-int4-32-plain-sym",
    "4bit-int4-128-dq-asym",
    "4bit-int4-32-plain-asym",  # GGUF Q4_1's layout: blocks of 32 with a scale and an offset each
    "4bit-nf4-4096-dq-sym",
]
KINDS = KINDS_4BIT + ["int8", "int8-asym-tensor"]
# (N, K, leading shape of x): aligned and unaligned K (blocks straddling rows, odd K), N-D inputs, M = 0
# (N, K, leading shape of x): aligned and unaligned K (blocks straddling rows, odd K), N-D inputs, M = 0, and
# K > 1024 with M > 4 (the panel GEMM accumulating over several K panels, aligned and not)
SHAPES = [
    (64, 256, (1,)),
    (48, 256, (3,)),
    (40, 384, (2, 5)),
    (33, 70, (4,)),
    (16, 129, (17,)),
    (24, 128, (0,)),
    (20, 2304, (6,)),
    (12, 2200, (2, 3)),
]


def check_linear(layer, x: np.ndarray, W: np.ndarray, b: np.ndarray | None, out_u: float = 0.0):
    y = layer(Tensor(x)).asnumpy()
    assert y.shape == x.shape[:-1] + (W.shape[0],) and y.dtype == x.dtype
    assert_matmul_close(y, x, W, b, out_u=out_u, what=type(layer).__name__)
    return y


def check_llm_int8(y: np.ndarray, layer, x: np.ndarray, threshold: float):
    """Identical integer part; only the float sum over the outlier columns (and the final scaling, the
    bias add) may round differently from the numpy decomposition."""
    cb, scb, b = layer.weight.asnumpy(), layer.SCB.asnumpy(), layer.bias.asnumpy()
    ref = fm.int8_mixed_matmul(x, cb, scb, threshold, bias=b).reshape(-1, cb.shape[0])
    W = fm.int8_vectorwise_dequant(cb, scb)
    tol = matmul_bound(x, W) + np.abs(ref) * 4 * U32
    assert_within(y.reshape(ref.shape), ref, tol, "LLM.int8")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k", "lead"), SHAPES)
def test_forward_matches_float64_oracle(ms_cpu, backend, kind, n, k, lead):
    layer = make(kind, n, k, backend)
    x = np.random.default_rng(k).standard_normal(lead + (k,)).astype(np.float32)
    check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())


@pytest.fixture
def isa(request):
    """Run a test on one instruction set (skipped where the CPU lacks it), back to "auto" afterwards."""
    name = request.param
    if name not in _lib.supported_isas():
        pytest.skip(f"this CPU has no {name}")
    _lib.set_isa(name)
    yield name
    _lib.set_isa("auto")


ALL_ISAS = ["avx512", "avx2", "portable"]
# M = 1 (fused small-M path), M = 6 (panel GEMM), K > 1024 (several panels), unaligned K, and K = 576 = 4.5 x 128
# (SmolLM2's hidden size: the nibble-plane path with a last half chunk, rows in pairs) at M = 1 and 4, with rows
# left over after the last whole group of pairs (21 rows at M = 1: groups of 8; K = 192, 13 rows at M = 3)
ISA_SHAPES = [
    (40, 256, (1,)),
    (24, 130, (6,)),
    (20, 2304, (5,)),
    (33, 70, (2,)),
    (24, 576, (1,)),
    (12, 576, (4,)),
    (21, 576, (1,)),
    (13, 192, (3,)),
]


@needs_lib
@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("kind", KINDS + ["llm_int8-3.0", "llm_int8-0.0"])
@pytest.mark.parametrize(("n", "k", "lead"), ISA_SHAPES)
def test_every_instruction_set(ms_cpu, isa, kind, n, k, lead):
    assert _lib.isa() == isa
    x = np.random.default_rng(3).standard_normal(lead + (k,)).astype(np.float32)
    x[..., 7] *= 10  # an outlier column for LLM.int8
    layer = make(kind, n, k, "cpu")
    if kind.startswith("llm_int8"):
        check_llm_int8(layer(Tensor(x)).asnumpy(), layer, x, float(kind.split("-")[1]))
    else:
        check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())


@needs_lib
@pytest.mark.parametrize("isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym", "4bit-fp4-64-plain-sym", "int8"])
def test_gradient_kernels_on_every_instruction_set(ms_cpu, isa, kind):
    # (150, 650, 530): three panels of weight rows (64, 64, 22), three blocks of dx rows (256, 256, 18) with
    # partial register tiles, and a K slice ending in a vector and a scalar tail
    for n, k, m in ((40, 130, 6), (24, 2304, 3), (150, 650, 530)):
        layer = make(kind, n, k, "cpu", seed=k)
        dy = np.random.default_rng(n).standard_normal((m, n)).astype(np.float32)
        x = Tensor(np.zeros((m, k), np.float32))
        dx = ms.grad(lambda t: (layer(t) * Tensor(dy)).sum())(x).asnumpy()  # noqa: B023
        # dx = dy @ W_deq: the product "dy @ (W_deq^T)^T"
        assert_matmul_close(dx, dy, layer.dequantized_weight().T, what=f"dx on {isa}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0])
@pytest.mark.parametrize(("n", "k", "lead"), [(64, 256, (1,)), (48, 200, (3, 4)), (33, 70, (9,)), (8, 64, (0,))])
def test_llm_int8_matches_the_numpy_decomposition(ms_cpu, backend, threshold, n, k, lead):
    layer = make(f"llm_int8-{threshold}", n, k, backend)
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal(lead + (k,)).astype(np.float32)
    if x.size:
        x[..., 3] *= 8.0  # an outlier feature
        x.reshape(-1, k)[0, 11] = -7.0
    check_llm_int8(layer(Tensor(x)).asnumpy(), layer, x, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym", "int8", "llm_int8-6.0"])
def test_input_gradient_is_dy_times_dequantized_weight(ms_cpu, backend, kind):
    layer = make(kind, 40, 130, backend)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 130)).astype(np.float32))
    dy = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32)
    dx = ms.grad(lambda t: (layer(t) * Tensor(dy)).sum())(x).asnumpy()
    assert dx.shape == (2, 3, 130)
    assert_matmul_close(dx, dy, layer.dequantized_weight().T, what="dx = dy @ W")
    # and the weight gets no gradient: only the bias is trainable
    assert [p.name.split(".")[-1] for p in layer.trainable_params()] == ["bias"]


@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym"])
def test_input_gradient_without_bias_in_a_jit_train_step(ms_cpu, kind):
    """A bias-less 4-bit layer's bprop (no column sums of dy) inside ms.jit + value_and_grad."""
    layer = make(kind, 40, 130, "cpu", bias=False)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 130)).astype(np.float32))
    dy = Tensor(np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32))

    def loss(t):
        return (layer(t) * dy).sum()

    grad_fn = ms.value_and_grad(loss, 0)

    @ms.jit
    def step(t):
        return grad_fn(t)

    _, dx = step(x)
    assert_matmul_close(dx.asnumpy(), dy.asnumpy(), layer.dequantized_weight().T, what="dx = dy @ W, no bias")
    assert layer.trainable_params() == []


def test_gradient_matches_finite_differences(ms_cpu):
    layer = make("4bit-nf4-64-dq-sym", 8, 64, BACKENDS[0])
    x0 = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float64)
    loss = lambda t: (layer(t) ** 2).sum()  # noqa: E731
    g = ms.grad(loss)(Tensor(x0.astype(np.float32))).asnumpy()
    eps = 1e-2
    for i in (0, 13, 63):
        e = np.zeros_like(x0)
        e[0, i] = eps
        fd = loss(Tensor((x0 + e).astype(np.float32))).asnumpy() - loss(Tensor((x0 - e).astype(np.float32))).asnumpy()
        # the loss is quadratic in x, so the central difference is exact up to float32 rounding of the two losses
        assert fd / (2 * eps) == pytest.approx(g[0, i], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "int8", "llm_int8-6.0"])
def test_float16_activations(ms_cpu, kind):
    layer = make(kind, 32, 128, BACKENDS[0])
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float16)
    y = layer(Tensor(x)).asnumpy()
    assert y.dtype == np.float16
    if kind.startswith("llm_int8"):  # the same decomposition on the (exactly representable) float16 inputs
        y32 = layer(Tensor(x.astype(np.float32))).asnumpy()
        assert_within(y, y32, np.abs(y32) * U16, "one float16 rounding of the float32 result")
    else:  # float32 arithmetic, one rounding of the result to float16
        check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy(), out_u=U16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_dtype_float16_rounds_the_input_and_the_output(ms_cpu, backend):
    rng = np.random.default_rng(8)
    W = (rng.standard_normal((24, 96)) * 0.05).astype(np.float32)
    layer = Linear4bit(
        96,
        24,
        True,
        "nf4",
        64,
        True,
        weight=W,
        bias_value=np.zeros(24, np.float32),
        compute_dtype="float16",
        backend=backend,
    )
    x = (rng.standard_normal((3, 96)) * 3).astype(np.float32)
    y = layer(Tensor(x)).asnumpy()
    assert y.dtype == np.float32
    Wd = layer.dequantized_weight()
    # x rounded to float16 (relative U16 per element), float32 sum, one float16 rounding of the result
    ref = x.astype(np.float64) @ Wd.T.astype(np.float64)
    mag = np.abs(x.astype(np.float64)) @ np.abs(Wd.T.astype(np.float64))
    bound = (U16 * (1 + U16) + matmul_bound(x, Wd) / np.maximum(mag, 1e-300)) * mag * (1 + U16) + U16 * np.abs(ref)
    assert_within(y, ref, bound, "float16 compute")
    # and float16 compute is not float32 compute: the input rounding is visible
    assert not np.array_equal(y, make("4bit-nf4-64-dq-sym", 24, 96, backend)(Tensor(x)).asnumpy())


@pytest.fixture
def graph_mode(ms_cpu):
    ms_cpu.set_context(mode=ms_cpu.GRAPH_MODE)
    yield ms_cpu
    ms_cpu.set_context(mode=ms_cpu.PYNATIVE_MODE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym", "int8", "llm_int8-6.0"])
def test_graph_mode_static_and_dynamic_shapes(graph_mode, backend, kind):
    llm = kind.startswith("llm_int8")

    def check(layer, x):
        if llm:
            y = layer(Tensor(x)).asnumpy()
            assert y.shape == x.shape[:-1] + (24,)
            check_llm_int8(y, layer, x, 6.0)
        else:
            check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())

    layer = make(kind, 24, 130, backend)
    x = np.random.default_rng(6).standard_normal((3, 130)).astype(np.float32)
    x[0, 5] = 9.0  # an outlier for LLM.int8
    check(layer, x)
    dyn = make(kind, 24, 130, backend)
    dyn.set_inputs(Tensor(shape=[None, None, 130], dtype=ms.float32))
    for lead in ((2, 3), (1, 7)):
        xd = np.random.default_rng(len(lead)).standard_normal(lead + (130,)).astype(np.float32)
        xd[0, 0, 17] = -8.0
        check(dyn, xd)
    dy = np.ones((6, 24), np.float32)
    g = ms.grad(dyn)(Tensor(np.ones((2, 3, 130), np.float32))).asnumpy()
    assert_matmul_close(g.reshape(6, 130), dy, dyn.dequantized_weight().T, what="graph-mode dx")


@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "int8", "llm_int8-6.0"])
def test_jit(ms_cpu, kind):
    layer = make(kind, 24, 256, BACKENDS[0])

    @ms.jit
    def f(t):
        return layer(t) * 2.0

    x = np.random.default_rng(7).standard_normal((4, 256)).astype(np.float32)
    # the same kernel on the same input, then an exact doubling
    np.testing.assert_array_equal(f(Tensor(x)).asnumpy(), 2.0 * layer(Tensor(x)).asnumpy())


FUZZ_KINDS = [
    "4bit-nf4-64-dq-sym",
    "4bit-nf4-64-plain-sym",
    "4bit-fp4-64-dq-sym",
    "4bit-fp4-128-plain-sym",
    "4bit-int4-32-plain-sym",
    "4bit-int4-64-dq-asym",
    "4bit-nf4-256-plain-sym",
    "int8",
    "int8-asym-tensor",
    "llm_int8",
]


FUZZ_CASE = dict(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    m=st.integers(0, 9),
    kind=st.sampled_from(FUZZ_KINDS),
    threshold=st.sampled_from([0.0, 1.5, 6.0]),
    isa=st.sampled_from(ALL_ISAS),
    threads=st.integers(1, 3),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)


@needs_lib
@settings(max_examples=60)
@given(**FUZZ_CASE)
def test_kernel_fuzz_against_oracle(n, k, m, kind, threshold, isa, threads, half, seed):
    fuzz_case(n, k, m, kind, threshold, isa, threads, half, seed)


@needs_lib
@pytest.mark.slow
@settings(max_examples=2000, derandomize=False)
@given(**FUZZ_CASE)
def test_kernel_fuzz_long(n, k, m, kind, threshold, isa, threads, half, seed):
    """The same property on 2,000 fresh random cases each run (`pytest -m slow`, about 30 s on 2 cores)."""
    fuzz_case(n, k, m, kind, threshold, isa, threads, half, seed)


def fuzz_case(n, k, m, kind, threshold, isa, threads, half, seed):
    """Shapes (K odd, K < blocksize, blocks straddling rows, N = 1, M = 0), formats, double quantization,
    thresholds, float16 inputs, thread counts and every instruction set against the oracle."""
    import mindspore

    mindspore.set_device("CPU")
    if isa not in _lib.supported_isas():
        isa = "portable"
    if kind == "llm_int8":
        kind = f"llm_int8-{threshold}"
    layer = make(kind, n, k, "cpu", seed=seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * rng.choice([0.5, 3.0], size=(1, k))).astype(np.float16 if half else np.float32)
    threads_before = _lib.get_num_threads()
    _lib.set_isa(isa)
    _lib.set_num_threads(threads)
    try:
        y = layer(Tensor(x)).asnumpy()
    finally:
        _lib.set_isa("auto")
        _lib.set_num_threads(threads_before)
    assert y.shape == (m, n) and y.dtype == x.dtype
    if kind.startswith("llm_int8"):
        y32 = y.astype(np.float32)
        if half:  # the decomposition in float32 on the exact float16 inputs, then one float16 rounding
            cb, scb, b = layer.weight.asnumpy(), layer.SCB.asnumpy(), layer.bias.asnumpy()
            ref = fm.int8_mixed_matmul(x.astype(np.float32), cb, scb, threshold, bias=b)
            tol = matmul_bound(x, fm.int8_vectorwise_dequant(cb, scb)) + np.abs(ref) * (4 * U32 + U16)
            assert_within(y32, ref, tol, "LLM.int8 float16")
        else:
            check_llm_int8(y32, layer, x.astype(np.float32), threshold)
    else:
        assert_matmul_close(y, x, layer.dequantized_weight(), layer.bias.asnumpy(), out_u=U16 if half else 0.0)
