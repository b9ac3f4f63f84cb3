"""Loading the library, instruction sets, threads, and the fallback when the library is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from msbnb_pass import kernels
from msbnb_pass.kernels import _lib

needs_lib = pytest.mark.skipif(not _lib.available(), reason="kernel library not built")


@needs_lib
def test_threads_and_isa():
    before = kernels.get_num_threads()
    kernels.set_num_threads(1)
    assert kernels.get_num_threads() == 1
    kernels.set_num_threads(before)
    assert kernels.isa() in ("avx512", "avx2", "portable")
    kernels.set_isa("portable")
    assert kernels.isa() == "portable"
    kernels.set_isa("auto")
    assert kernels.isa() == _lib.load().msbnb_best_isa().decode()


@needs_lib
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2"])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError, match=f"num_threads must be a positive integer, got {bad!r}"):
        kernels.set_num_threads(bad)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GLOG_v": "3", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


@needs_lib
def test_bad_thread_env_var_is_a_clear_error():
    out = _run("from msbnb_pass.kernels import _lib; _lib.load()", MSBNB_NUM_THREADS="0")
    assert out.returncode != 0
    assert "MSBNB_NUM_THREADS must be a positive integer (kernel threads), got 0" in out.stderr
    out = _run("from msbnb_pass.kernels import _lib; _lib.load()", MSBNB_NUM_THREADS="many")
    assert "MSBNB_NUM_THREADS must be a positive integer (kernel threads), got 'many'" in out.stderr
    out = _run("from msbnb_pass import kernels; print(kernels.get_num_threads())", MSBNB_NUM_THREADS="3")
    assert out.stdout.strip() == "3"


def test_missing_library_falls_back_to_reference_with_one_warning():
    code = """
import logging, numpy as np
logging.basicConfig(level=logging.WARNING)
from msbnb_pass.kernels import _lib
_lib.library_path = lambda: None
import mindspore as ms
ms.set_device("CPU")
from msbnb_pass import kernels, Linear4bit
print("backend", kernels.get_backend())
layer = Linear4bit(64, 32)
layer2 = Linear4bit(64, 32)
print(type(layer.kernel).__name__, layer(ms.Tensor(np.ones((2, 64), np.float32))).shape)
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "backend reference" in out.stdout and "ReferenceLinear4bit (2, 32)" in out.stdout
    assert out.stderr.count("falling back to the 'reference' backend") == 1


def test_backend_selection_errors():
    with pytest.raises(ValueError, match=r"backend must be one of \('cpu', 'reference'\), got 'gpu'"):
        kernels.set_backend("gpu")
    kernels.set_backend("reference")
    try:
        assert kernels.get_backend() == "reference"
    finally:
        kernels.set_backend(None)
