"""Tolerances derived from the computation, for every float comparison in the suite.

float32 GEMMs sum in an order that depends on the BLAS kernel, the CPU, the thread count and variables
such as ``OPENBLAS_CORETYPE``, so a fixed ``atol``/``rtol`` on a matmul output is a latent failure.
Instead every check here is an error bound:

* one product ``y = x @ W^T (+ b)`` computed in float32 in *any* order satisfies, element by element,
  ``|y - y64| <= gamma_{K+t} * (|x| @ |W|^T + |b|)`` with ``gamma_n = n u / (1 - n u)``, ``u = 2^-24``
  [Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1]; ``y64`` is the float64 product of
  the same float32 operands and ``t`` counts the extra roundings around the sum (bias add, a scale
  applied after the sum, a cast);
* two float32 results of the same product differ by at most twice that;
* whole networks (several products chained through norms and softmax) are compared norm-wise: the
  difference is at most ``gamma_n * ||y||_inf * amplification`` where ``n`` is the summation length along
  the longest chain of products and ``amplification`` the documented growth through the nonlinear
  layers (the caller states both; see :func:`assert_network_close`).

Each helper fails with the largest error, the bound at that element and their ratio.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16
UBF16 = 2.0**-8  # unit roundoff of bfloat16


def gamma(n: int | float, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum or product chain."""
    nu = n * u
    assert nu < 1, f"gamma_{n} undefined for u={u}"
    return nu / (1 - nu)


def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])


def matmul_magnitude(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """sum_k |x_mk| |w_nk| (+ |b_n|) in float64, shape [rows of x, N]: what every rounding error scales with."""
    mag = np.abs(_rows(x)) @ np.abs(np.asarray(w, np.float64)).T
    if bias is not None:
        mag = mag + np.abs(np.asarray(bias, np.float64))
    return mag


def matmul_bound(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, extra: int = 2) -> np.ndarray:
    """The float32 rounding bound of ``x @ w.T (+ bias)`` for every output element, [rows of x, N]."""
    K = np.shape(x)[-1]
    return gamma(K + extra) * matmul_magnitude(x, w, bias) + np.finfo(np.float32).tiny


def _report(err: np.ndarray, bound: np.ndarray, what: str) -> str:
    ratio = err / bound
    i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return (
        f"{what}: max error {err.max():.3e}; worst element {tuple(int(v) for v in i)} has error {err[i]:.3e} "
        f"against a bound of {bound[i]:.3e} ({ratio[i]:.2f}x the bound)"
    )


def assert_within(actual: np.ndarray, desired: np.ndarray, bound: np.ndarray | float, what: str = "result") -> None:
    """|actual - desired| <= bound element by element (shapes broadcast), NaN never passing."""
    a = np.asarray(actual, np.float64)
    d = np.asarray(desired, np.float64)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != expected {d.shape}"
    err = np.abs(a - d)
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    ok = err <= bound
    if not np.all(ok):
        bad = ~ok & ~np.isnan(err)
        if np.isnan(err).any():
            raise AssertionError(f"{what}: {int(np.isnan(err).sum())} NaN difference(s)")
        raise AssertionError(_report(np.where(bad, err, 0.0), bound, what))


def assert_matmul_close(
    y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    extra: int = 2,
    out_u: float = 0.0,
    what: str = "matmul",
) -> None:
    """``y`` (any leading shape) equals the float64 ``x @ w.T + bias`` within float32 rounding.

    ``out_u`` adds one rounding of the output to a narrower type (``U16`` for a float16 output).
    """
    ref = _rows(x) @ np.asarray(w, np.float64).T
    if bias is not None:
        ref = ref + np.asarray(bias, np.float64)
    bound = matmul_bound(x, w, bias, extra) * (1 + out_u) + out_u * np.abs(ref)
    assert_within(_rows(y), ref, bound, what)


def assert_same_product(
    a: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    extra: int = 2,
    what: str = "two evaluations of one product",
) -> None:
    """Two float32 evaluations of the same ``x @ w.T + bias`` (different order): within twice the bound."""
    assert_within(_rows(a), _rows(b), 2 * matmul_bound(x, w, bias, extra), what)


def assert_network_close(
    actual: np.ndarray, desired: np.ndarray, *, n_terms: int, amplification: float = 1.0, what: str = "network output"
) -> None:
    """Two float32 evaluations of one network differ by at most ``2 gamma_n ||desired||_inf * amplification``.

    ``n_terms`` is the summation length along the longest chain of products (e.g. the sum of the K of the
    matmuls one output passes through); ``amplification`` bounds how much the layers between them can grow a
    relative perturbation (1 for a purely linear chain; a LayerNorm / RMSNorm divides by the row's RMS, a
    softmax by its sum: the caller states the factor it derived).
    """
    d = np.asarray(desired, np.float64)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    assert_within(actual, d, 2 * gamma(n_terms) * amplification * scale + np.finfo(np.float32).tiny, what)
