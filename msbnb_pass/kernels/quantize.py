"""Fast quantizers: the C++ twins of ``msbnb_pass.formats``, bit-identical to it.

Quantizing a model goes through these. Each falls back to the numpy oracle when the kernel library is
not available; the results are the same bytes either way.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from ..formats import _checks
from ..formats.codebooks import QUANT_TYPES_4BIT, code_sort_order, get_4bit_code
from ..formats.quant_state import QuantState
from . import _lib


def quantize_4bit(
    A, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False, *, symmetric: bool = True
) -> tuple[np.ndarray, QuantState]:
    """Same contract and bytes as :func:`msbnb_pass.formats.quantize_4bit`, ~50x faster."""
    if not _lib.available():
        return formats.quantize_4bit(A, blocksize, quant_type, compress_statistics, symmetric=symmetric)
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    if not symmetric and quant_type != "int4":
        raise ValueError(f"symmetric=False is only defined for quant_type='int4', got quant_type={quant_type!r}")
    blocksize = _checks.check_blocksize(blocksize)
    arr = _checks.float_array(A, "A", finite=False)  # the kernel counts NaN/Inf while it reads
    if arr.dtype == np.float64:  # values beyond float32 would turn into Inf in the cast below
        _checks.check_finite(arr, "A")
    dtype = "float16" if arr.dtype == np.float16 else "float32"
    code = get_4bit_code(quant_type, symmetric)
    order = code_sort_order(quant_type, code).astype(np.uint8)
    try:
        packed, absmax, block_offset = _lib.quantize_4bit_blocks(arr, blocksize, code, order, symmetric)
    except FloatingPointError:
        _checks.check_finite(arr, "A")
        raise
    state = QuantState(
        quant_type=quant_type,
        blocksize=blocksize,
        dtype=dtype,
        shape=tuple(arr.shape),
        absmax=absmax,
        code=code,
        block_offset=block_offset,
    )
    _checks.check_block_stats(absmax, block_offset)
    return packed, (compress_absmax(state) if compress_statistics else state)


def compress_absmax(state: QuantState) -> QuantState:
    """Double quantization of a state's absmax (same result as ``formats.compress_absmax``)."""
    if not _lib.available():
        return formats.compress_absmax(state)
    return formats.compress_absmax(state, quantizer=_lib.quantize_blockwise_8bit)


def int8_vectorwise_quant(A) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and bytes as :func:`msbnb_pass.formats.int8_vectorwise_quant`."""
    if not _lib.available():
        return formats.int8_vectorwise_quant(A)
    arr = _checks.float_array(A, "A")
    cb, scb = _lib.int8_rowwise(arr.reshape(-1, arr.shape[-1]))
    return cb.reshape(arr.shape), scb


def quantize_int8(W, symmetric: bool = True, per_channel: bool = True):
    """Same contract and bytes as :func:`msbnb_pass.formats.quantize_int8` (fast path: symmetric per channel)."""
    if symmetric and per_channel and _lib.available():
        arr = _checks.float_array(W, "weight", ndim=2)
        cb, scb = _lib.int8_rowwise(arr)
        return cb, scb / np.float32(127.0), None
    return formats.quantize_int8(W, symmetric=symmetric, per_channel=per_channel)
