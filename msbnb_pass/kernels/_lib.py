"""Loading the C++ kernel library and its ctypes API (instruction set, threads, quantizers).

The library is found next to this file (built by ``pip install``). If it is missing or fails to load,
``load()`` returns None and logs one warning; the "reference" backend then serves every op.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ABI_VERSION = 1
ISAS = ("avx512", "avx2", "portable")
ENV_THREADS = "MSBNB_NUM_THREADS"
ENV_ISA = "MSBNB_ISA"
# Measured with tools/bench_kernels.py on the 2-core development VM (see README): one kernel thread
# per core; MindSpore's own pool is idle while an aot kernel runs inside a compiled graph.
DEFAULT_THREADS = min(2, os.cpu_count() or 1)


def library_path() -> Path | None:
    """Path of the built kernel library, or None if it was not built."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_msbnb_cpu*.so"))
    return found[0] if found else None


def _parse_threads(value: str, source: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{source} must be a positive integer (kernel threads), got {value!r}") from None
    if n < 1:
        raise ValueError(f"{source} must be a positive integer (kernel threads), got {n}")
    return n


@cache
def load() -> ctypes.CDLL | None:
    """The loaded library with its ctypes signatures, or None (with one warning) when unavailable."""
    path = library_path()
    if path is None:
        logger.warning(
            "msbnb_pass: the C++ kernel library was not built (no C++ compiler at install time?); "
            "falling back to the 'reference' backend (dequantize + MatMul), which is correct but slow"
        )
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.msbnb_abi_version() != ABI_VERSION:
            raise OSError(f"ABI version {lib.msbnb_abi_version()} != {ABI_VERSION}")
    except (OSError, AttributeError) as exc:
        logger.warning(
            "msbnb_pass: could not load the kernel library %s (%s); falling back to the 'reference' backend", path, exc
        )
        return None
    lib.msbnb_last_error.restype = ctypes.c_char_p
    lib.msbnb_isa.restype = ctypes.c_char_p
    lib.msbnb_best_isa.restype = ctypes.c_char_p
    lib.msbnb_set_isa.argtypes = [ctypes.c_char_p]
    lib.msbnb_isa_supported.argtypes = [ctypes.c_char_p]
    lib.msbnb_set_num_threads.argtypes = [ctypes.c_int]
    lib.msbnb_set_bf16_native.argtypes = [ctypes.c_int]
    lib.msbnb_set_amx.argtypes = [ctypes.c_int]
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.msbnb_quantize_4bit.argtypes = [p, i64, i64, p, p, i32, p, p, p]
    lib.msbnb_quantize_blockwise_8bit.argtypes = [p, i64, i64, p, p, p]
    lib.msbnb_int8_rowwise.argtypes = [p, i64, i64, p, p]
    lib.msbnb_gptq_batch.argtypes = [p, i64, i64, p, i64, p, p, p, p, p, p, i32, p, p]
    threads = os.environ.get(ENV_THREADS)
    lib.msbnb_set_num_threads(_parse_threads(threads, ENV_THREADS) if threads else DEFAULT_THREADS)
    isa = os.environ.get(ENV_ISA)
    if isa:
        _apply_isa(lib, isa, ENV_ISA)
    logger.debug("msbnb_pass: loaded %s (isa %s)", path, lib.msbnb_isa().decode())
    return lib


def available() -> bool:
    return load() is not None


def _require() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("the msbnb_pass kernel library is not available (see the warning above)")
    return lib


def _apply_isa(lib: ctypes.CDLL, name: str, source: str) -> None:
    if name not in (*ISAS, "auto"):
        raise ValueError(f"{source} must be one of {(*ISAS, 'auto')}, got {name!r}")
    if lib.msbnb_set_isa(name.encode()) != 0:
        best = lib.msbnb_best_isa().decode()
        raise ValueError(f"{source}={name!r}: this CPU does not support it (best available: {best!r})")


def isa() -> str:
    """The instruction set the kernels run with: "avx512", "avx2" or "portable"."""
    return _require().msbnb_isa().decode()


def supported_isas() -> list[str]:
    """Instruction sets this CPU can run, best first."""
    lib = _require()
    return [name for name in ISAS if lib.msbnb_isa_supported(name.encode())]


def set_isa(name: str) -> None:
    """Force an instruction set ("avx512", "avx2", "portable", or "auto" for the best this CPU has)."""
    _apply_isa(_require(), name, "isa")


def cpu_has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (``vdpbf16ps``)."""
    return bool(_require().msbnb_cpu_has_bf16())


def bf16_native() -> bool:
    """Whether bfloat16 compute runs on ``vdpbf16ps`` now (else on its exact emulation)."""
    return bool(_require().msbnb_bf16_native())


def set_bf16_native(on: bool) -> None:
    """Use ``vdpbf16ps`` for bfloat16 compute where the CPU has it (True, the default) or always the emulation."""
    if not isinstance(on, bool):
        raise TypeError(f"set_bf16_native takes a bool, got {on!r}")
    _require().msbnb_set_bf16_native(int(on))


def _amx_kinds(bits: int) -> tuple[str, ...]:
    return tuple(name for bit, name in ((1, "bfloat16"), (2, "int8")) if bits & bit)


def cpu_has_amx() -> tuple[str, ...]:
    """The compute modes this CPU has AMX tiles for (``"bfloat16"``, ``"int8"``; empty when none, or when Linux
    does not let this process use them)."""
    return _amx_kinds(_require().msbnb_cpu_has_amx())


def amx() -> tuple[str, ...]:
    """The compute modes whose batches run on AMX tiles now: bfloat16 from 8 rows of x (while ``bf16_native()``),
    int8 from 5 rows (blocks and in_features in whole 64-element steps); empty when none."""
    return _amx_kinds(_require().msbnb_amx())


def set_amx(on: bool) -> None:
    """Run bfloat16 and int8 batches on AMX tiles where the CPU has them (True, the default) or on the vector path.

    bfloat16: the tiles multiply the same bf16 operands but sum each output in their own order, so the last bits
    differ from the vector path (``vdpbf16ps`` and its emulation), within the same error bound; used only while
    ``bf16_native()`` is on. int8: the integer block sums are exact, and the float steps after them the same,
    so the tiles give the same bits as every other instruction set."""
    if not isinstance(on, bool):
        raise TypeError(f"set_amx takes a bool, got {on!r}")
    _require().msbnb_set_amx(int(on))


def get_num_threads() -> int:
    """Threads the kernels use (env MSBNB_NUM_THREADS, default one per core up to 2)."""
    return int(_require().msbnb_num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of kernel threads (a positive integer)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_threads must be a positive integer, got {n!r}")
    _require().msbnb_set_num_threads(int(n))


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: {_require().msbnb_last_error().decode()}")


def quantize_4bit_blocks(flat: np.ndarray, blocksize: int, code: np.ndarray, order: np.ndarray, symmetric: bool):
    """The C++ twin of ``formats.blockwise``'s 4-bit quantizer: (packed [(n+1)//2, 1], absmax, block_offset)."""
    lib = _require()
    flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
    n = flat.size
    nblocks = -(-n // blocksize)
    packed = np.empty(((n + 1) // 2, 1), np.uint8)
    absmax = np.empty(nblocks, np.float32)
    offset = None if symmetric else np.empty(nblocks, np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    order = np.ascontiguousarray(order, dtype=np.uint8)
    rc = lib.msbnb_quantize_4bit(
        _ptr(flat), n, blocksize, _ptr(code), _ptr(order), int(symmetric), _ptr(packed), _ptr(absmax), _ptr(offset)
    )
    if rc == 4:  # non-finite input: let the caller produce the precise message
        raise FloatingPointError(lib.msbnb_last_error().decode())
    _check(rc, "quantize_4bit")
    return packed, absmax, offset


def quantize_blockwise_8bit(flat: np.ndarray, blocksize: int, code: np.ndarray):
    """The C++ twin of the 8-bit blockwise quantizer: (uint8 codes, float32 absmax per block)."""
    lib = _require()
    flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
    out = np.empty(flat.size, np.uint8)
    absmax = np.empty(-(-flat.size // blocksize), np.float32)
    code = np.ascontiguousarray(code, dtype=np.float32)
    _check(
        lib.msbnb_quantize_blockwise_8bit(_ptr(flat), flat.size, blocksize, _ptr(code), _ptr(out), _ptr(absmax)),
        "quantize_blockwise",
    )
    return out, absmax


def int8_rowwise(a2d: np.ndarray):
    """The C++ twin of ``int8_vectorwise_quant``: (CB int8, SCB float32)."""
    lib = _require()
    a2d = np.ascontiguousarray(a2d, dtype=np.float32)
    rows, cols = a2d.shape
    cb = np.empty((rows, cols), np.int8)
    scb = np.empty(rows, np.float32)
    _check(lib.msbnb_int8_rowwise(_ptr(a2d), rows, cols, _ptr(cb), _ptr(scb)), "int8_rowwise")
    return cb, scb


def gptq_batch(w, u, scale, inv, off, code, bounds, order, codes, err) -> None:
    """GPTQ's inner loop over one lazy batch (static scales), in place: ``w`` [b, n] float32 (the batch's
    columns), ``u`` [b, >= b] the batch's block of the inverse factor, ``scale``/``inv``/``off`` [b, n]
    (``off`` None: symmetric), the code book; writes ``codes`` [b, n] uint8 and ``err`` [b, n]. The same
    float32 operations in the same order as the numpy loop of ``formats.gptq.gptq_quantize``."""
    lib = _require()
    b, n = w.shape
    for name, a in (("w", w), ("u", u), ("scale", scale), ("inv", inv), ("err", err)):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"gptq_batch: {name} must be a C-contiguous float32 array")
    if off is not None and (off.dtype != np.float32 or not off.flags.c_contiguous):
        raise ValueError("gptq_batch: off must be a C-contiguous float32 array")
    if codes.dtype != np.uint8 or not codes.flags.c_contiguous or codes.shape != (b, n):
        raise ValueError(f"gptq_batch: codes must be a C-contiguous uint8 array of shape {(b, n)}")
    code = np.ascontiguousarray(code, np.float32)
    bounds = np.ascontiguousarray(bounds, np.float32)
    order = np.ascontiguousarray(order, np.uint8)
    rc = lib.msbnb_gptq_batch(
        _ptr(w),
        b,
        n,
        _ptr(u),
        u.shape[1],
        _ptr(scale),
        _ptr(inv),
        _ptr(off),
        _ptr(code),
        _ptr(bounds),
        _ptr(order),
        len(code),
        _ptr(codes),
        _ptr(err),
    )
    _check(rc, "gptq_batch")
