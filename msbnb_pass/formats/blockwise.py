"""Blockwise quantization: 4-bit NF4/FP4/INT4 with packing and double quantization, and 8-bit dynamic.

The layout is bitsandbytes': the tensor is flattened row-major and cut into contiguous blocks of
``blocksize`` elements (blocks may straddle rows; the last block may be partial). Each block keeps a
float32 absmax; values are scaled into [-1, 1] and mapped to the nearest entry of a code table. Two 4-bit
indices share a byte, the first element in the high nibble. The rounding rules that make the bytes
identical to bitsandbytes 0.50 on CPU:

* full blocks are scaled by multiplying with the float32 reciprocal ``1 / max(absmax, 1e-38)``; the
  partial last block is divided by ``max(absmax, 1e-38)`` (and stores that clamped absmax);
* scaled values are clamped to [-1, 1];
* the nearest code is found against the float32 midpoints of the sorted code, a value exactly on a
  midpoint going to the lower code.

Double quantization (``compress_statistics``) subtracts the mean absmax and quantizes the result with the
8-bit dynamic map in blocks of 256. bitsandbytes' CPU path rounds those 8-bit codes through a lookup table;
this module takes the exact nearest code, so about 1% of the 8-bit absmax codes differ by one step (the
4-bit codes are unaffected). Both decode to valid statistics.
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .codebooks import QUANT_TYPES_4BIT, code_sort_order, create_dynamic_map, get_4bit_code
from .quant_state import NESTED_BLOCKSIZE, QuantState

_TINY = np.float32(1e-38)  # bitsandbytes' floor for absmax before taking its reciprocal


def pack_4bit(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit indices (uint8 in [0, 15]) two per byte, first in the high nibble: ``[(n+1)//2, 1]``.

    An odd count is padded with index 0.
    """
    flat = np.asarray(codes).reshape(-1)
    if flat.dtype != np.uint8:
        if flat.size and (flat.min() < 0 or flat.max() > 15):
            raise ValueError(f"pack_4bit: codes must be in [0, 15], got range [{flat.min()}, {flat.max()}]")
        flat = flat.astype(np.uint8)
    elif flat.size and flat.max() > 15:
        raise ValueError(f"pack_4bit: codes must be in [0, 15], got a maximum of {flat.max()}")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_4bit`: the first ``n`` 4-bit indices as a flat uint8 array."""
    flat = np.asarray(packed).reshape(-1)
    if flat.dtype != np.uint8:
        flat = flat.view(np.uint8) if flat.dtype.itemsize == 1 else flat.astype(np.uint8)
    if n > 2 * flat.size or n < 0:
        raise ValueError(f"unpack_4bit: {flat.size} bytes hold at most {2 * flat.size} values, asked for {n}")
    out = np.empty(2 * flat.size, dtype=np.uint8)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0x0F
    return out[:n]


def _scale_blocks(flat: np.ndarray, blocksize: int, symmetric: bool):
    """Scale a flat float32 array blockwise into [-1, 1]: returns (scaled, absmax, block_offset|None)."""
    n = flat.size
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    parts = []
    if symmetric:
        absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
        inv = np.float32(1.0) / np.maximum(absmax, _TINY)
        parts.append(blocks * inv[:, None])
        if rem:
            am = np.maximum(np.abs(flat[full:]).max(), _TINY)
            absmax = np.concatenate([absmax, np.array([am], np.float32)])
            parts.append((flat[full:] / am)[None, :])
        offset = None
    else:
        lo = blocks.min(axis=1) if full else np.zeros(0, np.float32)
        hi = blocks.max(axis=1) if full else np.zeros(0, np.float32)
        half = (hi - lo) * np.float32(0.5)
        mid = (hi + lo) * np.float32(0.5)
        inv = np.float32(1.0) / np.maximum(half, _TINY)
        parts.append((blocks - mid[:, None]) * inv[:, None])
        absmax, offset = half, mid
        if rem:
            tail = flat[full:]
            t_half = np.maximum((tail.max() - tail.min()) * np.float32(0.5), _TINY)
            t_mid = (tail.max() + tail.min()) * np.float32(0.5)
            absmax = np.concatenate([absmax, np.array([t_half], np.float32)])
            offset = np.concatenate([offset, np.array([t_mid], np.float32)])
            parts.append(((tail - t_mid) / t_half)[None, :])
    scaled = np.concatenate([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
    np.clip(scaled, -1.0, 1.0, out=scaled)
    return scaled, absmax.astype(np.float32, copy=False), offset


def nearest_code(scaled: np.ndarray, code: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Index (uint8) of the nearest ``code`` entry for each value; ties on a midpoint go to the lower code.

    ``order`` visits ``code`` in ascending order (default: a stable argsort).
    """
    code = np.asarray(code, dtype=np.float32)
    if order is None:
        order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / np.float32(2.0)
    if len(code) <= 16:
        # counting the midpoints below each value is ~3x faster than searchsorted for 15 midpoints
        idx = np.zeros(scaled.shape, dtype=np.uint8)
        for b in bounds:
            idx += scaled > b
    else:
        idx = np.searchsorted(bounds, scaled, side="left")
    if np.array_equal(order, np.arange(len(code))):
        return idx.astype(np.uint8, copy=False)
    return np.asarray(order, dtype=np.uint8)[idx]


def _as_float32_input(A, name: str) -> tuple[np.ndarray, str]:
    arr = _checks.float_array(A, name)
    dtype = "float16" if arr.dtype == np.float16 else "float32"
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), dtype


def quantize_blockwise(A, code: np.ndarray | None = None, blocksize: int = 4096) -> tuple[np.ndarray, QuantState]:
    """8-bit blockwise quantization with a 256-entry code (default: the signed dynamic map).

    Returns uint8 indices shaped like ``A`` and a QuantState holding the float32 absmax per block.
    """
    flat, dtype = _as_float32_input(A, "A")
    blocksize = _checks.check_blocksize(blocksize)
    code = create_dynamic_map(signed=True) if code is None else np.asarray(code, dtype=np.float32)
    if code.shape != (256,):
        raise ValueError(f"quantize_blockwise: code must have 256 entries, got shape {code.shape}")
    scaled, absmax, _ = _scale_blocks(flat, blocksize, symmetric=True)
    q = nearest_code(scaled, code).reshape(np.shape(A))
    state = QuantState(
        quant_type="dynamic", blocksize=blocksize, dtype=dtype, shape=tuple(np.shape(A)), absmax=absmax, code=code
    )
    return q, state


def dequantize_blockwise(A: np.ndarray, quant_state: QuantState) -> np.ndarray:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax`` per block, float32."""
    q = np.asarray(A).reshape(-1)
    n = q.size
    absmax = quant_state.dequantized_absmax()
    expected = -(-n // quant_state.blocksize)
    if absmax.size != expected:
        raise ValueError(
            f"dequantize_blockwise: {n} values in blocks of {quant_state.blocksize} need {expected} absmax "
            f"entries, the quant_state has {absmax.size}"
        )
    values = quant_state.code[q]
    out = values * np.repeat(absmax, quant_state.blocksize)[:n]
    return out.reshape(np.shape(A)).astype(np.float32, copy=False)


def quantize_4bit(
    A,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    *,
    symmetric: bool = True,
) -> tuple[np.ndarray, QuantState]:
    """Quantize ``A`` (any shape, float16/32/64) to packed 4-bit codes in bitsandbytes' layout.

    Returns ``(packed, quant_state)``: ``packed`` is uint8 ``[(A.size + 1) // 2, 1]``. For ``"nf4"`` and
    ``"fp4"`` the bytes and the float32 absmax equal bitsandbytes 0.50's ``quantize_4bit`` on CPU.
    ``"int4"`` is the linear signed format (absmax / 7 per block); with ``symmetric=False`` it is
    asymmetric: 16 levels spanning each block's [min, max], the block midpoint kept in
    ``quant_state.block_offset``. ``compress_statistics=True`` double-quantizes the absmax (8-bit
    dynamic map, blocks of 256, mean subtracted).
    """
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    if not symmetric and quant_type != "int4":
        raise ValueError(f"symmetric=False is only defined for quant_type='int4', got quant_type={quant_type!r}")
    blocksize = _checks.check_blocksize(blocksize)
    shape = tuple(np.shape(A))
    flat, dtype = _as_float32_input(A, "A")
    code = get_4bit_code(quant_type, symmetric)
    order = code_sort_order(quant_type, code)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled, absmax, block_offset = _scale_blocks(flat, blocksize, symmetric)
    _checks.check_block_stats(absmax, block_offset)
    if scaled.size % 2:
        # bitsandbytes pads an odd count with the value 0.0 (not index 0) before packing
        scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
    packed = pack_4bit(nearest_code(scaled, code, order))
    state = QuantState(
        quant_type=quant_type,
        blocksize=blocksize,
        dtype=dtype,
        shape=shape,
        absmax=absmax,
        code=code,
        block_offset=block_offset,
    )
    if compress_statistics:
        state = compress_absmax(state)
    return packed, state


def compress_absmax(state: QuantState, quantizer=None) -> QuantState:
    """Double quantization: the float32 absmax becomes 8-bit dynamic codes + nested absmax + offset.

    ``quantizer(values, blocksize, code) -> (codes, absmax)`` does the 8-bit blockwise step (default: this
    module's numpy one; the kernels pass their bit-identical C++ twin).
    """
    if state.nested:
        return state
    absmax = state.absmax
    # float64 accumulation: the correctly rounded float32 mean (torch's float32 sum may differ in the last bit)
    offset = np.float32(absmax.mean(dtype=np.float64))
    dyn = create_dynamic_map(signed=True)
    if quantizer is None:
        qabsmax, state2 = quantize_blockwise(absmax - offset, code=dyn, blocksize=NESTED_BLOCKSIZE)
    else:
        qabsmax, nested_absmax = quantizer(absmax - offset, NESTED_BLOCKSIZE, dyn)
        state2 = QuantState(
            quant_type="dynamic",
            blocksize=NESTED_BLOCKSIZE,
            dtype="float32",
            shape=tuple(absmax.shape),
            absmax=nested_absmax,
            code=dyn,
        )
    return QuantState(
        quant_type=state.quant_type,
        blocksize=state.blocksize,
        dtype=state.dtype,
        shape=state.shape,
        absmax=qabsmax,
        code=state.code,
        state2=state2,
        offset=offset,
        block_offset=state.block_offset,
    )


def dequantize_4bit(packed: np.ndarray, quant_state: QuantState, out_dtype=np.float32) -> np.ndarray:
    """Decode packed 4-bit codes to a float array of ``quant_state.shape``: ``code[i] * absmax (+ offset)``."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    n = quant_state.numel
    packed = np.asarray(packed)
    if packed.size != (n + 1) // 2:
        raise ValueError(
            f"dequantize_4bit: shape {quant_state.shape} needs {(n + 1) // 2} packed bytes, got {packed.size}"
        )
    idx = unpack_4bit(packed, n)
    absmax = quant_state.dequantized_absmax()
    if absmax.size != quant_state.n_blocks:
        raise ValueError(
            f"dequantize_4bit: {n} values in blocks of {quant_state.blocksize} need {quant_state.n_blocks} "
            f"absmax entries, the quant_state has {absmax.size}"
        )
    values = quant_state.code[idx]
    out = values * np.repeat(absmax, quant_state.blocksize)[:n]
    if quant_state.block_offset is not None:
        out += np.repeat(quant_state.block_offset, quant_state.blocksize)[:n]
    return out.reshape(quant_state.shape).astype(out_dtype, copy=False)


def dequantize_4bit_rows(packed: np.ndarray, quant_state: QuantState, rows) -> np.ndarray:
    """Rows ``rows`` of a 2-D 4-bit tensor (float32 ``[len(rows), K]``) without decoding the rest."""
    if len(quant_state.shape) != 2:
        raise ValueError(f"dequantize_4bit_rows needs a 2-D quant_state, got shape {quant_state.shape}")
    n_rows, k = quant_state.shape
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"dequantize_4bit_rows: rows must be in [0, {n_rows}), got {rows.min()}..{rows.max()}")
    flat = rows[:, None] * k + np.arange(k, dtype=np.int64)[None, :]
    data = np.asarray(packed).reshape(-1)
    byte = data[flat >> 1]
    idx = np.where(flat & 1, byte & 0x0F, byte >> 4)
    blocks = flat // quant_state.blocksize
    values = quant_state.code[idx] * quant_state.dequantized_absmax()[blocks]
    if quant_state.block_offset is not None:
        values = values + quant_state.block_offset[blocks]
    return values.astype(np.float32, copy=False)
