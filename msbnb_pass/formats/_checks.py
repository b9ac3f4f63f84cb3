"""Input validation shared by the format functions: one place that turns bad input into clear errors."""

from __future__ import annotations

import numpy as np

from ..errors import QuantizationError

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def float_array(a, name: str, *, ndim: int | None = None, allow_empty: bool = False, finite: bool = True) -> np.ndarray:
    """``a`` as a (finite, unless ``finite=False``) floating-point numpy array, or a TypeError/ValueError
    naming ``name``. "Finite" means finite in float32, the precision every quantizer computes in."""
    arr = np.asarray(a)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16, float32 or float64), got dtype {arr.dtype}")
    if arr.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)} ({arr.ndim}-D)")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}); nothing to quantize")
    if finite:
        check_finite(arr, name)
    return arr


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise QuantizationError (a ValueError) if ``arr`` holds NaN or Inf, or float64 values that become
    Inf in float32 (quantization computes in float32), saying how many and where the first one is."""
    if not arr.size:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        bad = ~finite
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise QuantizationError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/Inf), first at index {first}: "
            f"{arr[first]!r}; quantization needs finite values"
        )
    if arr.dtype == np.float64:
        with np.errstate(over="ignore"):
            big = np.abs(arr) > FLOAT32_MAX
        if big.any():
            first = tuple(int(i) for i in np.argwhere(big)[0])
            raise QuantizationError(
                f"{name} contains {int(big.sum())} value(s) beyond the float32 range (|x| > {FLOAT32_MAX:.7g}), "
                f"first at index {first}: {float(arr[first])!r}; quantization computes in float32, where "
                f"they would become Inf"
            )


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"{name} must be an int, one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    if int(blocksize) not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in [32, 4096], one of {VALID_BLOCKSIZES}, got {blocksize}")
    return int(blocksize)


def dtype_name(dtype) -> str:
    """Canonical dtype string as bitsandbytes writes it ("float32", "float16", "bfloat16")."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    name = name.removeprefix("torch.").removeprefix("mindspore.")
    aliases = {
        "float": "float32",
        "half": "float16",
        "Float32": "float32",
        "Float16": "float16",
        "BFloat16": "bfloat16",
    }
    return aliases.get(name, name)


def check_block_stats(absmax: np.ndarray, block_offset: np.ndarray | None, name: str = "A") -> None:
    """Finite input can still give an Inf scale: a block spanning more than float32's range (asymmetric
    int4 with values near +-3.4e38). Refuse it, naming the block, instead of storing Inf."""
    bad = ~np.isfinite(absmax)
    if block_offset is not None:
        bad |= ~np.isfinite(block_offset)
    if bad.any():
        block = int(np.flatnonzero(bad)[0])
        raise QuantizationError(
            f"{name}: block {block} spans a range wider than float32 can hold (its scale would be Inf); "
            "quantize values this large symmetrically or scale them down first"
        )
