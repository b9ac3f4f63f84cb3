"""Builds the C++ kernel library at install time (``pip install .`` and ``pip install -e .``).

Everything else about the package is in pyproject.toml. The extension is a plain shared library with
``extern "C"`` kernels (MindSpore's aot ABI and a ctypes API), not a Python module. It is optional: on a
machine without a C++ compiler the install still succeeds, and msbnb_pass falls back to its "reference"
backend (MindSpore ops) with one warning at first use.
"""

from setuptools import Extension, setup

CSRC = "msbnb_pass/kernels/csrc"

kernels = Extension(
    "msbnb_pass.kernels._msbnb_cpu",
    sources=[
        f"{CSRC}/{name}.cc" for name in ("api", "threadpool", "decode", "impl_avx512", "impl_avx2", "impl_portable")
    ],
    depends=[f"{CSRC}/msbnb.h", f"{CSRC}/impl_common.inc", f"{CSRC}/quant_scalar.inc"],
    language="c++",
    extra_compile_args=[
        "-std=c++17",
        "-O3",
        "-fvisibility=hidden",
        # bit-exact quantizers: no fused multiply-add contraction, no fast-math reassociation
        "-ffp-contract=off",
        "-fno-fast-math",
        "-pthread",
        "-Wno-uninitialized",
        "-Wno-maybe-uninitialized",
    ],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[kernels])
