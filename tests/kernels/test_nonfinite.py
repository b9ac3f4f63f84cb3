"""NaN and +-Inf inputs propagate through every quantized cell as they do through a float matmul.

For an input row holding NaN or +-Inf, the float product ``x @ W^T`` of that row is, for each output
column, NaN when some product ``x_k * W_nk`` is NaN (NaN input, or Inf times an exact 0 weight) or when
products of both infinite signs meet, else +-Inf when an infinite product occurs. That classification does
not depend on the summation order or on the finite terms, so the kernels (float32, any order) must match
the float64 oracle's classification exactly. Rows without NaN/Inf must come out finite and bit-identical
to a run in which the non-finite rows are replaced by zeros (no row leaks into another). The same holds for
the input gradient ``dx = dy @ W`` with a non-finite ``dy``.

LLM.int8() used to turn such rows into finite garbage (NaN is neither an outlier nor part of the absmax,
and casting NaN to int8 is undefined); it now computes them in float, as the int8 compute mode of the
4-bit and INT8 layers does. bfloat16 rounding keeps NaN and Inf, and no weight here is small enough to
flush to zero, so the float64 classification with the dequantized weights applies to it too.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from msbnb_pass import Linear4bit, Linear8bit, Linear8bitLt, kernels
from msbnb_pass.kernels import _lib

CPU = _lib.available()
ISAS = _lib.supported_isas() if CPU else []
KINDS = ["nf4-dq", "fp4", "int4-asym", "int8", "int8-asym", "llm_int8-0", "llm_int8-6"]
# the reduced-precision compute modes (kind@compute_dtype)
KINDS += ["nf4-dq@bfloat16", "nf4-dq@int8", "int8@bfloat16", "int8@int8"]


def make(kind: str, n: int, k: int, backend: str):
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    W[::3, 5] = 0.0  # Inf * 0 = NaN in a third of the columns
    W[1::3, 5] = np.abs(W[1::3, 5]) + 0.01  # a sign that is known: +Inf stays +Inf
    b = rng.standard_normal(n).astype(np.float32)
    kind, _, compute = kind.partition("@")
    common = dict(weight=W, bias_value=b, backend=backend)
    if compute:
        common["compute_dtype"] = compute
    if kind == "nf4-dq":
        return Linear4bit(k, n, True, "nf4", 64, True, **common)
    if kind == "fp4":
        return Linear4bit(k, n, True, "fp4", 64, False, **common)
    if kind == "int4-asym":
        return Linear4bit(k, n, True, "int4", 32, False, symmetric=False, **common)
    if kind == "int8":
        return Linear8bit(k, n, True, has_fp16_weights=False, **common)
    if kind == "int8-asym":
        return Linear8bit(k, n, True, has_fp16_weights=False, symmetric=False, per_channel=False, **common)
    return Linear8bitLt(k, n, True, threshold=float(kind.split("-")[1]), **common)


def inputs(k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [m, k] with non-finite rows, mask of those rows)."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((7, k)).astype(np.float32)
    rows[0, 10] = 8.0  # an outlier for LLM.int8() at threshold 6
    rows[1, 3] = np.nan
    rows[2, 5] = np.inf
    rows[3, 5], rows[3, 9] = np.inf, -np.inf
    rows[4, 0] = -np.inf
    rows[6, 1], rows[6, 7] = np.nan, np.inf
    order = {1: [2], 2: [2, 1], 3: [0, 3, 1], 7: [0, 1, 2, 3, 4, 5, 6], 9: [0, 1, 2, 3, 4, 5, 6, 0, 2]}[m]
    x = rows[order]
    return x, ~np.isfinite(x).all(axis=1)


def classify(v: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return np.where(np.isnan(v), 1, np.where(v == np.inf, 2, np.where(v == -np.inf, 3, 0)))


def expected_class(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    """IEEE class of a @ B^T computed from the products alone (order independent)."""
    with np.errstate(invalid="ignore"):
        prod = a.astype(np.float64)[:, None, :] * B.astype(np.float64)[None, :, :]
    nan = np.isnan(prod).any(-1) | ((prod == np.inf).any(-1) & (prod == -np.inf).any(-1))
    pos, neg = (prod == np.inf).any(-1), (prod == -np.inf).any(-1)
    return np.where(nan, 1, np.where(pos, 2, np.where(neg, 3, 0)))


def run(layer, x: np.ndarray, dtype) -> np.ndarray:
    return layer(Tensor(x.astype(dtype))).asnumpy().astype(np.float32)


def check_forward(layer, x: np.ndarray, bad: np.ndarray, dtype=np.float32) -> None:
    y = run(layer, x, dtype)
    W = layer.dequantized_weight()
    want = expected_class(x.astype(dtype).astype(np.float32), W)
    assert (want[bad] != 0).all() and (want[~bad] == 0).all()  # the fixture is what the test intends
    assert np.array_equal(classify(y), want), f"classes differ at {np.argwhere(classify(y) != want)[:5].tolist()}"
    clean = np.where(bad[:, None], 0.0, x).astype(np.float32)
    y_clean = run(layer, clean, dtype)
    np.testing.assert_array_equal(y[~bad], y_clean[~bad])


def isa_params():
    return [pytest.param(isa, id=isa) for isa in ISAS]


@pytest.fixture
def isa(request):
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa("auto")


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 9])
def test_forward_cpu(ms_cpu, isa, kind, m):
    layer = make(kind, 24, 256, "cpu")
    x, bad = inputs(256, m)
    check_forward(layer, x, bad)


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "llm_int8-6"])
def test_forward_cpu_unaligned_and_float16(ms_cpu, kind):
    """K = 70: 4-bit blocks straddle rows (generic decoder); float16 activations."""
    layer = make(kind, 20, 70, "cpu")
    x, bad = inputs(70, 7)
    check_forward(layer, x, bad)
    check_forward(layer, x, bad, np.float16)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_reference(ms_cpu, kind):
    layer = make(kind, 24, 256, "reference")
    x, bad = inputs(256, 7)
    check_forward(layer, x, bad)


def dx_of(layer, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    gt = Tensor(g)

    def f(xx):
        return (layer(xx) * gt).sum()

    return ms.grad(f)(Tensor(x)).asnumpy()


@pytest.mark.skipif(not CPU, reason="kernel library not built")
@pytest.mark.parametrize("isa", isa_params(), indirect=True)
@pytest.mark.parametrize("kind", ["nf4-dq", "int4-asym", "int8", "llm_int8-6"])
def test_dx(ms_cpu, isa, kind):
    n, k = 24, 256
    layer = make(kind, n, k, "cpu")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, k)).astype(np.float32)
    g = rng.standard_normal((6, n)).astype(np.float32)
    g[1, 2] = np.nan
    g[3, 4] = np.inf
    g[4, 4], g[4, 5] = np.inf, -np.inf
    bad = ~np.isfinite(g).all(axis=1)
    dx = dx_of(layer, x, g)
    W = layer.dequantized_weight()
    want = expected_class(g, W.T)
    assert (want[bad] != 0).any() and (want[~bad] == 0).all()
    assert np.array_equal(classify(dx), want)
    dx_clean = dx_of(layer, x, np.where(bad[:, None], 0.0, g).astype(np.float32))
    np.testing.assert_array_equal(dx[~bad], dx_clean[~bad])
