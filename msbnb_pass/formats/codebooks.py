"""The code tables (codebooks) of the quantization formats.

A 4-bit format is a table of 16 float32 values in [-1, 1]; a stored nibble is an index into it and the
dequantized value is ``code[index] * absmax`` of its block. The 8-bit dynamic map (256 entries) quantizes
the absmax statistics in double quantization and the 8-bit optimizer states.

NF4 and FP4 are bitsandbytes' tables, value for value (float32), so packed bytes are interchangeable.
"""

from __future__ import annotations

from functools import cache

import numpy as np

# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1 without inf/nan) in bit-pattern order: bit 3 is the sign, bits 0-2 the magnitude code.
# Pattern 8 is a second zero (bitsandbytes stores +0 there, not -0).
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# The order in which bitsandbytes' quantizer visits FP4's codes when it searches the sorted table: the
# two zeros (patterns 0 and 8) sort as [0, 8], so a scaled value in (-m, 0] gets pattern 0 and one in
# (0, m] gets pattern 8, where m is half the smallest non-zero magnitude. Needed for identical bytes.
FP4_SORT_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")


@cache
def _code_4bit(quant_type: str, symmetric: bool) -> np.ndarray:
    if quant_type == "nf4":
        code = np.array(_NF4, dtype=np.float32)
    elif quant_type == "fp4":
        code = np.array(_FP4_UNSCALED, dtype=np.float32) / np.float32(12.0)
    elif quant_type == "int4" and symmetric:
        # The seed's linear signed format: q in [-7, 7] stored as nibble q + 8 (nibble 0 is never produced).
        code = (np.arange(16, dtype=np.float32) - np.float32(8.0)) / np.float32(7.0)
    elif quant_type == "int4":
        # Asymmetric: 16 evenly spaced levels over [-1, 1] around the block's midpoint.
        code = (np.arange(16, dtype=np.float32) * np.float32(2.0) - np.float32(15.0)) / np.float32(15.0)
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    code.setflags(write=False)
    return code


def get_4bit_code(quant_type: str, symmetric: bool = True) -> np.ndarray:
    """The 16-entry float32 code table of a 4-bit format (a fresh, writable copy)."""
    return _code_4bit(quant_type, bool(symmetric)).copy()


def code_sort_order(quant_type: str, code: np.ndarray) -> np.ndarray:
    """Indices that visit ``code`` in ascending order, with bitsandbytes' tie order for FP4's two zeros."""
    if quant_type == "fp4":
        return np.array(FP4_SORT_ORDER, dtype=np.int64)
    return np.argsort(code, kind="stable")


@cache
def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def midpoints(n_boundaries: int) -> np.ndarray:
        # float32 boundaries evenly spaced over [0.1, 1]; the map holds the midpoints between them
        bounds = _linspace_f32(0.1, 1.0, n_boundaries)
        return (bounds[:-1] + bounds[1:]) / np.float32(2.0)

    exponent = 0
    for exponent in range(max_exponent_bits):
        if signed:
            n = 2 ** (exponent + non_sign_bits - max_exponent_bits) + 1
        else:
            n = 2 ** (exponent + non_sign_bits - max_exponent_bits + 1) + 1
        scale = 10.0 ** (exponent - (max_exponent_bits - 1))
        means = midpoints(n)
        values += (np.float32(scale) * means).tolist()
        if signed:
            values += (np.float32(-scale) * means).tolist()
    if additional_items > 0:
        scale = 10.0 ** (exponent - (max_exponent_bits - 1))
        means = midpoints(additional_items + 1)
        values += (np.float32(scale) * means).tolist()
        if signed:
            values += (np.float32(-scale) * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: max_exponent_bits={max_exponent_bits}, total_bits={total_bits} give "
            f"{len(values)} values, expected {2**total_bits}"
        )
    values += [0.0] * (256 - len(values))
    out = np.array(sorted(values), dtype=np.float32)
    out.setflags(write=False)
    return out


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace the way torch computes it on x86 CPUs with AVX2/AVX-512: the first half forward
    from ``start``, the second half backward from ``end``, each element a single fused multiply-add
    (one rounding). This makes the dynamic map equal to bitsandbytes' bit for bit. (torch's portable
    build, ATEN_CPU_CAPABILITY=default, rounds twice and differs in the last bit of 42 entries.)"""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.empty(steps, dtype=np.float64)
    # float64 holds step * i + start exactly here (24-bit x 7-bit products), so casting rounds once.
    out[:half] = np.float64(start32) + step * idx[:half]
    out[half:] = np.float64(end32) - step * (steps - 1 - idx[half:])
    return out.astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic (exponent + fraction) map: 256 sorted float32 values in [-1, 1].

    Used with blocksize 256 to compress 4-bit absmax statistics (double quantization) and for 8-bit
    optimizer states. Equal, value for value, to ``bitsandbytes.functional.create_dynamic_map``.
    """
    if total_bits != 8:
        raise ValueError(f"create_dynamic_map: total_bits must be 8, got {total_bits}")
    if not 1 <= max_exponent_bits <= 7:
        raise ValueError(f"create_dynamic_map: max_exponent_bits must be in [1, 7], got {max_exponent_bits}")
    return _dynamic_map(bool(signed), int(max_exponent_bits), int(total_bits)).copy()
