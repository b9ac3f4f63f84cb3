"""The numpy oracle of the kernels' reduced-precision compute modes (``compute_dtype`` "bfloat16" and "int8").

bfloat16: both operands are rounded to bfloat16 (:func:`bf16_round`) and multiplied exactly; the kernels sum
the products in float32. int8: the activations are quantized per row and block (:func:`quantize_activations`),
the weights are int8 levels with a float32 scale per row and block, the integer dot product of each block
is exact and the blocks are combined in float32 (:func:`int8_matmul` gives the exact value of that sum and
the magnitude its float32 rounding is bounded by). Needs only numpy.
"""

from __future__ import annotations

import numpy as np

FLT_MIN = np.float32(1.1754943508222875e-38)
INT8_WEIGHT_BLOCK = 128  # the activation block of the weight-only INT8 layer in int8 compute


def bf16_round(a) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even) -> float32; NaN stays NaN, Inf stays Inf, values below the
    smallest normal float32 (bfloat16 denormals included) become signed zeros, as vdpbf16ps reads them."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    tiny = (u & 0x7F800000) == 0
    r = np.where(nan, (u >> 16) | 0x40, np.where(tiny, (u >> 16) & 0x8000, r))
    return (r.astype(np.uint32) << 16).view(np.float32).reshape(a.shape)


def int8_levels(code) -> np.ndarray:
    """The int8 level of each 4-bit code value: rint(127 * code), clamped to [-127, 127]."""
    c = np.asarray(code, np.float32)
    return np.clip(np.rint(c * np.float32(127.0)), -127, 127).astype(np.int8)


def quantize_activations(x2, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and block of ``block`` columns (the last block may be shorter): codes q = rint(x * (127 / a))
    clamped to [-127, 127] with a = max|x| over the block (float32 arithmetic, as the kernels do), and the
    scale a / 127. Returns (q int8 [M, nb*block] zero padded, scale float32 [M, nb])."""
    x2 = np.asarray(x2, np.float32)
    m, k = x2.shape
    nb = max(1, -(-k // block))
    xp = np.zeros((m, nb * block), np.float32)
    xp[:, :k] = x2
    xb = xp.reshape(m, nb, block)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        factor = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(xb * factor[..., None])
        subnormal = ~(factor <= np.float32(3.4028234663852886e38))
        if subnormal.any():  # 127 / a overflows: the kernels scale in float64
            exact = np.rint(xb.astype(np.float64) / amax[..., None].astype(np.float64) * 127.0)
            q = np.where(subnormal[..., None], exact, q)
    q = np.clip(q, -127, 127).astype(np.int8).reshape(m, nb * block)
    return q, (amax / np.float32(127.0)).astype(np.float32)


def int8_matmul(x2, levels, wscale, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 compute of ``x2 [M, K] @ W^T`` with W = levels [N, K] (int) times wscale [N, nb] per block.

    Returns (y, mag) in float64: y = sum_b dot_b * fl32(s_x,b * s_w,b) exactly, and mag = sum_b |that term|;
    the kernels' float32 result differs from y by at most gamma_(nb+2) * mag (one rounding per term, one per
    addition)."""
    x2 = np.asarray(x2, np.float32)
    m, k = x2.shape
    levels = np.asarray(levels)
    n = levels.shape[0]
    q, sx = quantize_activations(x2, block)
    nb = sx.shape[1]
    lv = np.zeros((n, nb * block), np.float64)
    lv[:, :k] = levels
    y = np.zeros((m, n))
    mag = np.zeros((m, n))
    wscale = np.asarray(wscale, np.float32).reshape(n, nb)
    for b in range(nb):
        sl = slice(b * block, (b + 1) * block)
        dot = q[:, sl].astype(np.float64) @ lv[:, sl].T  # exact: integers below 2^53
        s = (sx[:, b : b + 1] * wscale[None, :, b]).astype(np.float64)  # float32 product
        y += dot * s
        mag += np.abs(dot * s)
    return y, mag
