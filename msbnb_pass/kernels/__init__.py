"""Kernels: the fused C++ dequantize-matmul library and the registry of op implementations per backend.

Backends:

* ``"cpu"``: the C++ library built at install time (runtime dispatch to AVX-512 + VNNI, AVX2 or
  portable code), run as MindSpore ``ops.Custom(func_type="aot")`` ops.
* ``"reference"``: dequantize with MindSpore ops, then MatMul. Used when the library is missing (with one
  warning) and as the oracle in tests.

The default is ``"cpu"`` when the library loads, else ``"reference"``; ``MSBNB_BACKEND`` or
``set_backend()`` override it. Thread count: ``MSBNB_NUM_THREADS`` or ``set_num_threads()``. bfloat16 compute
uses AVX512-BF16's ``vdpbf16ps`` where the CPU has it (``cpu_has_bf16()``), else an exact emulation;
``set_bf16_native(False)`` forces the emulation. Batches run on Intel AMX tiles where the CPU has them
(``cpu_has_amx()``: bfloat16 from 8 rows of x, int8 compute from 5 with the same bits; ``set_amx(False)`` keeps
them on the vector path).
"""

from __future__ import annotations

import os
from typing import Any

from . import _lib
from ._lib import (
    amx,
    bf16_native,
    cpu_has_amx,
    cpu_has_bf16,
    get_num_threads,
    library_path,
    set_amx,
    set_bf16_native,
    set_num_threads,
)

BACKENDS = ("cpu", "reference")
ENV_BACKEND = "MSBNB_BACKEND"
_backend_override: str | None = None

__all__ = [
    "BACKENDS",
    "amx",
    "available_backends",
    "bf16_native",
    "cpu_has_amx",
    "cpu_has_bf16",
    "get_backend",
    "get_num_threads",
    "isa",
    "kernel_class",
    "library_path",
    "register_kernel",
    "set_backend",
    "set_amx",
    "set_bf16_native",
    "set_isa",
    "set_num_threads",
]


def available_backends() -> list[str]:
    """Backends that can run here ("reference" always; "cpu" when the library loads)."""
    return [b for b in BACKENDS if b != "cpu" or _lib.available()]


def get_backend() -> str:
    """The backend new quantized layers use."""
    name = _backend_override or os.environ.get(ENV_BACKEND)
    if name:
        _check_backend(name, ENV_BACKEND if not _backend_override else "backend")
        return name
    return "cpu" if _lib.available() else "reference"


def _check_backend(name: str, source: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "cpu" and not _lib.available():
        raise ValueError(f"{source}='cpu' needs the kernel library, which is not available here; use 'reference'")


def set_backend(name: str | None) -> None:
    """Choose the backend for layers created from now on (None: back to the default)."""
    global _backend_override
    if name is not None:
        _check_backend(name, "backend")
    _backend_override = name


def isa() -> str:
    """Instruction set of the C++ kernels: "avx512", "avx2" or "portable"."""
    return _lib.isa()


def set_isa(name: str) -> None:
    """Force the kernels' instruction set (for testing the fallbacks); "auto" restores the best."""
    _lib.set_isa(name)


def kernel_class(op: str, backend: str | None = None) -> Any:
    """The op Cell class implementing ``op`` ("linear4bit", "linear8bit", "llm_int8") on ``backend``."""
    from . import ops

    return ops.kernel_class(op, backend or get_backend())


def register_kernel(op: str, backend: str):
    """Class decorator registering a user op Cell for ``op`` on ``backend`` (same construct signature)."""
    from . import ops

    return ops.register_kernel(op, backend)
