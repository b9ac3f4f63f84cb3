"""The seed's functional API on MindSpore Tensors: quantize/dequantize weights, measure the error.

These work on 2-D weights ``[out_features, in_features]`` in the seed's layout: INT8 per output
channel (or per tensor), 4-bit in groups of ``group_size`` along each row, packed two per byte into
``[out_features, ceil(in_features / 2)]`` uint8 with the first element in the high nibble. (The
bitsandbytes-compatible flat layout, where blocks may straddle rows, is ``msbnb_pass.formats``; when
``in_features`` is a multiple of the group size the two layouts hold identical bytes.)

The arithmetic is the numpy oracle of ``msbnb_pass.formats``; inputs may be MindSpore Tensors or numpy
arrays and results are MindSpore Tensors.
"""

from __future__ import annotations

import math
from typing import Any

import mindspore as ms
import numpy as np

from .formats import _checks
from .formats import blockwise as _bw
from .formats import int8 as _int8
from .formats.codebooks import QUANT_TYPES_4BIT, code_sort_order, get_4bit_code
from .formats.quant_state import to_numpy

__all__ = [
    "dequantize_4bit",
    "dequantize_8bit",
    "estimate_quantization_error",
    "get_quantization_info",
    "quantize_4bit",
    "quantize_8bit",
]


def _weight_2d(weight: Any, name: str = "weight") -> np.ndarray:
    arr = to_numpy(weight)
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16 from MindSpore
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(_checks.float_array(arr, name, ndim=2), dtype=np.float32)


def _tensor(a: np.ndarray | None):
    return None if a is None else ms.Tensor(np.ascontiguousarray(a))


def quantize_8bit(weight: Any, symmetric: bool = True, per_channel: bool = True, group_size: int | None = None):
    """Quantize a 2-D float weight to int8: ``(weight_int8, scale, offset)``.

    ``scale`` is float32 ``[out_features]`` (per channel), ``[1]`` (per tensor) or, with ``group_size``,
    ``[out_features, ceil(in_features / group_size)]``; ``offset`` is the float32 zero point of
    asymmetric quantization, ``None`` when symmetric. ``weight ~= (q - offset) * scale``.
    """
    q, scale, offset = _int8.quantize_int8(
        _weight_2d(weight), symmetric=symmetric, per_channel=per_channel, group_size=group_size
    )
    return _tensor(q), _tensor(scale), _tensor(offset)


def dequantize_8bit(weight_int8: Any, scale: Any, offset: Any = None, group_size: int | None = None):
    """Inverse of :func:`quantize_8bit`: a float32 Tensor ``(q - offset) * scale``.

    A 2-D ``scale`` is per group; its group size is inferred (group sizes are powers of two) unless given.
    """
    q = to_numpy(weight_int8)
    off = None if offset is None else to_numpy(offset)
    return _tensor(_int8.dequantize_int8(q, to_numpy(scale), off, group_size=group_size))


def _check_4bit_args(group_size: int, quant_type: str, symmetric: bool) -> int:
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    if not symmetric and quant_type != "int4":
        raise ValueError(f"symmetric=False is only defined for quant_type='int4', got quant_type={quant_type!r}")
    return _checks.check_blocksize(group_size, "group_size")


def quantize_4bit(weight: Any, group_size: int = 128, quant_type: str = "int4", symmetric: bool = True):
    """Quantize a 2-D float weight to 4 bits in groups along each row: ``(packed, scale, offset)``.

    ``packed`` is uint8 ``[out, ceil(in / 2)]``; ``scale`` float32 ``[out, ceil(in / group_size)]`` (the
    group absmax, or half the group's range when asymmetric); ``offset`` the group midpoints of asymmetric
    int4, else ``None``. ``quant_type`` is "int4" (linear, absmax / 7), "nf4" or "fp4".
    """
    group_size = _check_4bit_args(group_size, quant_type, symmetric)
    w = _weight_2d(weight)
    rows, cols = w.shape
    n_groups = math.ceil(cols / group_size)
    padded = np.pad(w, ((0, 0), (0, n_groups * group_size - cols)), mode="edge")  # edge: keeps min/max/absmax
    scaled, scale, offset = _bw._scale_blocks(padded.reshape(-1), group_size, symmetric)
    code = get_4bit_code(quant_type, symmetric)
    idx = _bw.nearest_code(scaled, code, code_sort_order(quant_type, code)).reshape(rows, -1)[:, :cols]
    if cols % 2:
        idx = np.pad(idx, ((0, 0), (0, 1)))
    packed = (idx[:, 0::2] << 4) | idx[:, 1::2]
    scale = scale.reshape(rows, n_groups)
    offset = None if offset is None else offset.reshape(rows, n_groups)
    return _tensor(packed.astype(np.uint8)), _tensor(scale), _tensor(offset)


def dequantize_4bit(
    weight_int4: Any,
    scale: Any,
    offset: Any = None,
    group_size: int = 128,
    quant_type: str = "int4",
    in_features: int | None = None,
):
    """Inverse of :func:`quantize_4bit`: float32 ``[out, in_features]``.

    ``in_features`` defaults to twice the packed width; pass it when the original width was odd.
    """
    symmetric = offset is None
    group_size = _check_4bit_args(group_size, quant_type, symmetric)
    packed = to_numpy(weight_int4)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"weight_int4 must be a 2-D uint8 tensor [out, ceil(in/2)], got {packed.dtype} {packed.shape}")
    rows, half = packed.shape
    cols = 2 * half if in_features is None else int(in_features)
    if not 2 * half - 1 <= cols <= 2 * half:
        raise ValueError(
            f"in_features={cols} does not fit a packed width of {half} bytes (expected {2 * half - 1} or {2 * half})"
        )
    n_groups = math.ceil(cols / group_size)
    scale = np.asarray(to_numpy(scale), dtype=np.float32)
    if scale.shape != (rows, n_groups):
        raise ValueError(
            f"scale must have shape {(rows, n_groups)} for {rows}x{cols} in groups of {group_size}, got {scale.shape}"
        )
    idx = np.empty((rows, 2 * half), np.uint8)
    idx[:, 0::2] = packed >> 4
    idx[:, 1::2] = packed & 0x0F
    values = get_4bit_code(quant_type, symmetric)[idx[:, :cols]]
    group_of = np.arange(cols) // group_size
    out = values * scale[:, group_of]
    if offset is not None:
        off = np.asarray(to_numpy(offset), dtype=np.float32)
        if off.shape != scale.shape:
            raise ValueError(f"offset must have the shape of scale {scale.shape}, got {off.shape}")
        out += off[:, group_of]
    return _tensor(out.astype(np.float32))


def _error_metrics(ref: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    ref64, approx64 = ref.astype(np.float64).ravel(), approx.astype(np.float64).ravel()
    err = approx64 - ref64
    signal, noise = float(np.sum(ref64**2)), float(np.sum(err**2))
    denom = math.sqrt(signal) * math.sqrt(float(np.sum(approx64**2)))
    return {
        "max_abs_error": float(np.max(np.abs(err))) if err.size else 0.0,
        "mean_abs_error": float(np.mean(np.abs(err))) if err.size else 0.0,
        "mse": float(np.mean(err**2)) if err.size else 0.0,
        "relative_error": math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf),
        "sqnr_db": 10.0 * math.log10(signal / noise) if noise > 0 else math.inf,
        "cosine_similarity": float(ref64 @ approx64 / denom) if denom > 0 else (1.0 if noise == 0 else 0.0),
    }


def estimate_quantization_error(
    weight_fp: Any,
    weight_q: Any,
    scale: Any,
    offset: Any = None,
    *,
    group_size: int = 128,
    quant_type: str = "int4",
) -> dict[str, float]:
    """Error of a quantized weight against its float original.

    ``weight_q`` is int8 (from :func:`quantize_8bit`) or packed uint8 (from :func:`quantize_4bit`, with
    its ``group_size``/``quant_type``). Returns max/mean absolute error, MSE, relative error
    (``||W - W_q|| / ||W||``), SQNR in dB and cosine similarity.
    """
    ref = _weight_2d(weight_fp, "weight_fp")
    q = to_numpy(weight_q)
    if q.dtype == np.int8:
        approx = to_numpy(dequantize_8bit(q, scale, offset))  # scale per tensor, row or group
    elif q.dtype == np.uint8:
        approx = to_numpy(
            dequantize_4bit(q, scale, offset, group_size=group_size, quant_type=quant_type, in_features=ref.shape[1])
        )
    else:
        raise TypeError(f"weight_q must be int8 (8-bit) or uint8 (packed 4-bit), got dtype {q.dtype}")
    if approx.shape != ref.shape:
        raise ValueError(f"weight_q decodes to shape {approx.shape}, weight_fp has shape {ref.shape}")
    return _error_metrics(ref, approx)


def get_quantization_info(weight: Any, num_bits: int = 8, symmetric: bool = True) -> dict[str, Any]:
    """Statistics of a weight and what quantizing it per tensor to ``num_bits`` would give.

    Reports shape, value range, absmax, mean/std, the per-tensor scale and zero point, the quantization
    step, memory before (float32) and after, the compression ratio and the memory saving.
    """
    if isinstance(num_bits, bool) or num_bits not in (2, 3, 4, 8):
        raise ValueError(f"num_bits must be one of (2, 3, 4, 8), got {num_bits!r}")
    w = to_numpy(weight)
    if w.dtype.name == "bfloat16":
        w = w.astype(np.float32)
    w = _checks.float_array(w, "weight").astype(np.float32)
    lo, hi = float(w.min()), float(w.max())
    absmax = max(abs(lo), abs(hi))
    if symmetric:
        qmax = 2 ** (num_bits - 1) - 1
        scale = absmax / qmax if absmax > 0 else 1.0
        zero_point = 0.0
    else:
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        scale = (hi0 - lo0) / (2**num_bits - 1) if hi0 > lo0 else 1.0
        zero_point = float(
            np.clip(np.rint(-(2 ** (num_bits - 1)) - lo0 / scale), -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1)
        )
    original = int(w.size * 4)
    quantized = int(math.ceil(w.size * num_bits / 8))
    return {
        "shape": tuple(int(d) for d in w.shape),
        "numel": int(w.size),
        "dtype": str(w.dtype),
        "min": lo,
        "max": hi,
        "absmax": absmax,
        "mean": float(w.mean(dtype=np.float64)),
        "std": float(w.std(dtype=np.float64)),
        "num_bits": num_bits,
        "symmetric": symmetric,
        "scale": float(scale),
        "zero_point": zero_point,
        "original_bytes": original,
        "quantized_bytes": quantized,
        "compression_ratio": original / quantized,
        "memory_saving": 1.0 - quantized / original,
    }
