"""8-bit formats: LLM.int8() row-wise absmax (bitsandbytes' CB/SCB), symmetric/asymmetric per-channel or
per-tensor INT8, and the LLM.int8() mixed-precision matmul as a numpy reference.
"""

from __future__ import annotations

import numpy as np

from . import _checks

_INV_127 = np.float32(7.874015718698502e-3)  # 1/127 as bitsandbytes writes it (float32)
_INV_127_SQ = np.float32(1.0 / (127.0 * 127.0))


def _rows(A, name: str, allow_empty: bool = False) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = _checks.float_array(A, name, allow_empty=allow_empty)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, arr.shape[-1]), tuple(arr.shape)


def _rowwise_quant(A2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``round(A * 127 / absmax_row)`` exactly as bitsandbytes computes it (float32, half to even)."""
    stats = np.abs(A2).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        factor = np.where(stats > 0, np.float32(127.0) / stats, np.float32(0.0)).astype(np.float32)
        scaled = A2 * factor[:, None]
    overflow = ~np.isfinite(factor)
    if overflow.any():  # subnormal row absmax: 127 / absmax overflows float32, redo those rows in float64
        rows = A2[overflow].astype(np.float64)
        scaled[overflow] = rows / stats[overflow, None].astype(np.float64) * 127.0
    return np.clip(np.rint(scaled), -127, 127).astype(np.int8), stats


def int8_vectorwise_quant(A) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise absmax int8 quantization of LLM.int8(): ``(CB int8 like A, SCB float32 [rows])``.

    ``SCB[r] = max|A[r, :]|`` and ``CB = round(A * 127 / SCB)``; rows are all leading dimensions.
    Bit-identical to bitsandbytes' ``int8_vectorwise_quant`` (an all-zero row gives SCB 0 and CB 0).
    """
    A2, shape = _rows(A, "A")
    CB, SCB = _rowwise_quant(A2)
    return CB.reshape(shape), SCB


def int8_vectorwise_dequant(CB, SCB) -> np.ndarray:
    """``CB * SCB / 127`` (float32), rows broadcast over the last dimension, as bitsandbytes does."""
    CB = np.asarray(CB)
    if CB.dtype != np.int8:
        raise TypeError(f"CB must be int8, got dtype {CB.dtype}")
    rows = CB.reshape(-1, CB.shape[-1]) if CB.ndim else CB.reshape(1, 1)
    SCB = np.asarray(SCB, dtype=np.float32).reshape(-1)
    if SCB.size != rows.shape[0]:
        raise ValueError(f"SCB must have one entry per row of CB ({rows.shape[0]}), got {SCB.size}")
    return ((rows.astype(np.float32) * SCB[:, None]) * _INV_127).reshape(CB.shape)


def quantize_int8(
    W, symmetric: bool = True, per_channel: bool = True, group_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a 2-D weight ``[out, in]`` to int8: returns ``(q int8, scale float32, offset float32|None)``.

    Symmetric: ``scale = absmax / 127`` and ``q = round(W * 127 / absmax)`` (per output row it is exactly
    bitsandbytes' CB with ``SCB = 127 * scale``); ``offset`` is None. Asymmetric: the range
    ``[min(W, 0), max(W, 0)]`` maps onto [-128, 127] with ``scale = range / 255`` and an integer-valued
    zero point ``offset``; ``W ~= (q - offset) * scale``. ``per_channel`` gives one scale per output row
    (shape ``[out]``), otherwise a single scale (shape ``[1]``). ``group_size`` instead gives one scale per
    group of that many inputs along each row (shape ``[out, ceil(in / group_size)]``).
    """
    W = _checks.float_array(W, "weight", ndim=2)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if group_size is not None:
        gs = _checks.check_blocksize(group_size, "group_size")
        rows, cols = W.shape
        n_groups = -(-cols // gs)
        groups = np.pad(W, ((0, 0), (0, n_groups * gs - cols)), mode="edge").reshape(rows * n_groups, gs)
        q, scale, offset = quantize_int8(groups, symmetric=symmetric, per_channel=True)
        q = q.reshape(rows, n_groups * gs)[:, :cols]
        return (
            np.ascontiguousarray(q),
            scale.reshape(rows, n_groups),
            (None if offset is None else offset.reshape(rows, n_groups)),
        )
    if symmetric:
        if per_channel:
            q, absmax = _rowwise_quant(W)
        else:
            q2, am = _rowwise_quant(W.reshape(1, -1))
            q, absmax = q2.reshape(W.shape), am
        return q, absmax / np.float32(127.0), None
    axis = 1 if per_channel else None
    lo = np.minimum(W.min(axis=axis, keepdims=True), 0).astype(np.float32)
    hi = np.maximum(W.max(axis=axis, keepdims=True), 0).astype(np.float32)
    with np.errstate(over="ignore"):
        scale = (hi - lo) / np.float32(255.0)
    if not np.isfinite(scale).all():  # a range wider than float32's largest value (|W| near 3.4e38)
        wide = (hi.astype(np.float64) - lo.astype(np.float64)) / 255.0
        scale = np.where(np.isfinite(scale), scale, wide.astype(np.float32))
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero = np.clip(np.rint(np.float32(-128.0) - lo / scale), -128, 127).astype(np.float32)
    q = np.clip(np.rint(W / scale) + zero, -128, 127).astype(np.int8)
    return q, scale.reshape(-1), zero.reshape(-1)


def _expand_scale(scale: np.ndarray, shape: tuple[int, int], name: str, group_size: int | None) -> np.ndarray:
    """Broadcast a per-tensor ``[1]``, per-row ``[out]`` or per-group ``[out, groups]`` array to ``shape``.

    Without ``group_size`` the group size of a per-group array is the power of two that gives that many
    groups (group sizes are powers of two, so it is unique when there are two or more groups).
    """
    rows, cols = shape
    if scale.ndim == 2 and scale.shape[0] == rows:
        n_groups = scale.shape[1]
        if group_size is None:
            group_size = 1 << max(0, (-(-cols // max(n_groups, 1)) - 1).bit_length())
        if n_groups < 1 or -(-cols // group_size) != n_groups:
            raise ValueError(
                f"{name} has {n_groups} groups per row, but {cols} columns in groups of {group_size} make "
                f"{-(-cols // group_size)}"
            )
        return scale[:, np.arange(cols) // group_size]
    flat = scale.reshape(-1)
    if flat.size == 1:
        return np.broadcast_to(flat.reshape(1, 1), shape)
    if flat.size == rows:
        return np.broadcast_to(flat.reshape(rows, 1), shape)
    raise ValueError(
        f"{name} must have 1 entry (per tensor), {rows} (per row) or shape [{rows}, groups] (per group), "
        f"got shape {scale.shape}"
    )


def dequantize_int8(q, scale, offset=None, group_size: int | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: ``(q - offset) * scale`` with scale/offset per tensor, row or group."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"q must be int8, got dtype {q.dtype}")
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D [out, in], got shape {q.shape}")
    scale = np.asarray(scale, dtype=np.float32)
    values = q.astype(np.float32)
    if offset is not None:
        offset = np.asarray(offset, dtype=np.float32)
        if offset.shape != scale.shape:
            raise ValueError(f"offset must have the shape of scale {scale.shape}, got {offset.shape}")
        values = values - _expand_scale(offset, q.shape, "offset", group_size)
    return values * _expand_scale(scale, q.shape, "scale", group_size)


def outlier_columns(x, threshold: float) -> np.ndarray:
    """Indices of input columns (last dimension) holding any ``|x| >= threshold``; none when threshold <= 0."""
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    if threshold <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((np.abs(x2) >= threshold).any(axis=0))


def int8_mixed_matmul(x, CB, SCB, threshold: float = 0.0, bias=None) -> np.ndarray:
    """LLM.int8() reference: ``x @ dequant(CB, SCB).T (+ bias)`` computed the way bitsandbytes does.

    Input columns holding a value with ``|x| >= threshold`` (threshold > 0) are outlier columns: they are
    multiplied in float32 with the dequantized weight columns. The rest of ``x`` is quantized row-wise
    to int8 (the outlier values themselves excluded from the row absmax), multiplied int8 x int8 with
    exact integer accumulation, and scaled by ``SCA * SCB / 127**2``. Returns float32 ``[..., out]``.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 disables the outlier decomposition), got {threshold}")
    x2, shape = _rows(x, "x", allow_empty=True)
    CB = np.asarray(CB)
    if CB.dtype != np.int8 or CB.ndim != 2:
        raise TypeError(f"CB must be a 2-D int8 array [out, in], got {CB.dtype} with shape {CB.shape}")
    if CB.shape[1] != x2.shape[1]:
        raise ValueError(f"x has {x2.shape[1]} features but CB expects {CB.shape[1]} (CB shape {CB.shape})")
    SCB = np.asarray(SCB, dtype=np.float32).reshape(-1)
    if SCB.size != CB.shape[0]:
        raise ValueError(f"SCB must have {CB.shape[0]} entries (one per output row), got {SCB.size}")

    cols = outlier_columns(x2, threshold)
    xq = x2
    if cols.size:
        xq = x2.copy()
        xq[np.abs(xq) >= threshold] = 0.0
    CA, SCA = _rowwise_quant(xq)
    if cols.size:
        CA[:, cols] = 0
    acc = CA.astype(np.int32) @ CB.T.astype(np.int32)  # |acc| <= 127*127*K: int32 is exact for K < 133k
    out = acc.astype(np.float32) * (SCA[:, None] * SCB[None, :]) * _INV_127_SQ
    if cols.size:
        w_cols = int8_vectorwise_dequant(np.ascontiguousarray(CB[:, cols]), SCB)
        out += x2[:, cols] @ w_cols.T
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32).reshape(1, -1)
    return out.reshape(*shape[:-1], CB.shape[0])
