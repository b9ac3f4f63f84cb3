"""The fused kernels against the float64 oracle: every format, shape class, instruction set and execution mode.

Bound (fp32 rounding): every kernel sums K products in float32 in some order, so with u = 2**-24
|y - x @ W_deq^T| <= gamma * sum_k |x_k| |W_deq[n, k]| with gamma = (K + 2) u / (1 - (K + 2) u), where
W_deq are the oracle's dequantized weights (bit-identical to what the kernels decode) [Higham, Accuracy and
Stability of Numerical Algorithms, 3.1]. The extra 2 covers the NF4 path that scales partial sums by the
block absmax after multiplying the code with x. LLM.int8() sums its int8 products exactly, so it is
checked against the numpy oracle of the same decomposition instead.
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

U = 2.0**-24
BACKENDS = ["cpu", "reference"] if _lib.available() else ["reference"]


def fp32_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    K = x.shape[-1]
    gamma = (K + 2) * U / (1 - (K + 2) * U)
    return gamma * (np.abs(x.reshape(-1, K)).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


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
    "4bit-nf4-4096-dq-sym",
]
KINDS = KINDS_4BIT + ["int8", "int8-asym-tensor"]
# (N, K, leading shape of x): aligned and unaligned K (blocks straddling rows, odd K), N-D inputs, M = 0
SHAPES = [(64, 256, (1,)), (48, 256, (3,)), (40, 384, (2, 5)), (33, 70, (4,)), (16, 129, (17,)), (24, 128, (0,))]


def check_linear(layer, x: np.ndarray, W: np.ndarray, b: np.ndarray | None):
    y = layer(Tensor(x)).asnumpy()
    assert y.shape == x.shape[:-1] + (W.shape[0],) and y.dtype == x.dtype
    ref = x.reshape(-1, x.shape[-1]).astype(np.float64) @ W.T.astype(np.float64)
    if b is not None:
        ref = ref + b
    err = np.abs(y.reshape(ref.shape).astype(np.float64) - ref)
    bound = fp32_bound(x, W) + (np.abs(ref) * 2**-24 if b is not None else 0)
    assert np.all(err <= bound), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k", "lead"), SHAPES)
def test_forward_matches_float64_oracle(ms_cpu, backend, kind, n, k, lead):
    layer = make(kind, n, k, backend)
    x = np.random.default_rng(k).standard_normal(lead + (k,)).astype(np.float32)
    check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())


@pytest.mark.skipif(not _lib.available(), reason="kernel library not built")
@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("kind", KINDS + ["llm_int8-3.0"])
def test_fallback_instruction_sets(ms_cpu, isa, kind):
    if isa not in _lib.supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    x[:, 7] *= 10
    layer = make(kind, 40, 256, "cpu")
    y_best = layer(Tensor(x)).asnumpy()
    _lib.set_isa(isa)
    try:
        y = layer(Tensor(x)).asnumpy()
    finally:
        _lib.set_isa("auto")
    if kind.startswith("llm_int8"):
        np.testing.assert_allclose(y, y_best, rtol=1e-5, atol=1e-5)  # same exact integer sums
    else:
        check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())


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
    y = layer(Tensor(x)).asnumpy()
    cb, scb, b = layer.weight.asnumpy(), layer.SCB.asnumpy(), layer.bias.asnumpy()
    ref = fm.int8_mixed_matmul(x, cb, scb, threshold, bias=b)
    # identical integer part; only the float sum over the outlier columns may round differently
    W = fm.int8_vectorwise_dequant(cb, scb)
    tol = fp32_bound(x, W).reshape(ref.shape) + np.abs(ref) * 4 * U
    assert np.all(np.abs(y - ref) <= tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym", "int8", "llm_int8-6.0"])
def test_input_gradient_is_dy_times_dequantized_weight(ms_cpu, backend, kind):
    layer = make(kind, 40, 130, backend)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 130)).astype(np.float32))
    dy = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32)
    dx = ms.grad(lambda t: (layer(t) * Tensor(dy)).sum())(x).asnumpy()
    W = layer.dequantized_weight().astype(np.float64)
    ref = dy.reshape(-1, 40).astype(np.float64) @ W
    bound = fp32_bound(dy, W.T) + 1e-6
    assert np.all(np.abs(dx.reshape(ref.shape) - ref) <= bound)
    # and the weight gets no gradient: only the bias is trainable
    assert [p.name.split(".")[-1] for p in layer.trainable_params()] == ["bias"]


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
        assert fd / (2 * eps) == pytest.approx(g[0, i], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "int8", "llm_int8-6.0"])
def test_float16_activations(ms_cpu, kind):
    layer = make(kind, 32, 128, BACKENDS[0])
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float16)
    y = layer(Tensor(x)).asnumpy()
    assert y.dtype == np.float16
    ref = layer(Tensor(x.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=2e-3)  # one float16 rounding


@pytest.fixture
def graph_mode(ms_cpu):
    ms_cpu.set_context(mode=ms_cpu.GRAPH_MODE)
    yield ms_cpu
    ms_cpu.set_context(mode=ms_cpu.PYNATIVE_MODE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "4bit-int4-32-plain-asym", "int8", "llm_int8-6.0"])
def test_graph_mode_static_and_dynamic_shapes(graph_mode, backend, kind):
    layer = make(kind, 24, 130, backend)
    x = np.random.default_rng(6).standard_normal((3, 130)).astype(np.float32)
    ref = None
    if not kind.startswith("llm_int8"):
        check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())
    else:
        ref = fm.int8_mixed_matmul(x, layer.weight.asnumpy(), layer.SCB.asnumpy(), 6.0, layer.bias.asnumpy())
        np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    dyn = make(kind, 24, 130, backend)
    dyn.set_inputs(Tensor(shape=[None, None, 130], dtype=ms.float32))
    for lead in ((2, 3), (1, 7)):
        xd = np.random.default_rng(len(lead)).standard_normal(lead + (130,)).astype(np.float32)
        y = dyn(Tensor(xd)).asnumpy()
        assert y.shape == lead + (24,)
        if ref is None:
            check_linear(dyn, xd, dyn.dequantized_weight(), dyn.bias.asnumpy())
    g = ms.grad(dyn)(Tensor(np.ones((2, 3, 130), np.float32))).asnumpy()
    np.testing.assert_allclose(g.reshape(6, 130)[0], dyn.dequantized_weight().sum(axis=0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["4bit-nf4-64-dq-sym", "int8", "llm_int8-6.0"])
def test_jit(ms_cpu, kind):
    layer = make(kind, 24, 256, BACKENDS[0])

    @ms.jit
    def f(t):
        return layer(t) * 2.0

    x = np.random.default_rng(7).standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(f(Tensor(x)).asnumpy(), 2.0 * layer(Tensor(x)).asnumpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not _lib.available(), reason="kernel library not built")
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    m=st.integers(0, 9),
    kind=st.sampled_from(KINDS),
)
def test_kernel_fuzz_against_oracle(n, k, m, kind):
    import mindspore

    mindspore.set_device("CPU")
    if kind.startswith("4bit") and k < 2 and n * k % 2:
        k = 2
    layer = make(kind, n, k, "cpu", seed=n * 1000 + k)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    check_linear(layer, x, layer.dequantized_weight(), layer.bias.asnumpy())
