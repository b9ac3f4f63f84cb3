"""The C++ kernels under AddressSanitizer + UBSan: tools/check_kernels_asan.sh builds the library with
tools/kernel_selftest.cc and calls every aot entry point on random shapes with exact-size buffers, on every
instruction set this CPU has and on 1 and 2 threads, so an out-of-bounds access or undefined behaviour aborts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _asan_available(tmp_path: Path) -> bool:
    if shutil.which("g++") is None:
        return False
    src = tmp_path / "probe.cc"
    src.write_text("int main() { return 0; }\n")
    probe = subprocess.run(
        ["g++", "-fsanitize=address,undefined", str(src), "-o", str(tmp_path / "probe")], capture_output=True
    )
    return probe.returncode == 0


def test_kernels_are_clean_under_asan_and_ubsan(tmp_path):
    if not _asan_available(tmp_path):
        pytest.skip("g++ with AddressSanitizer/UBSan (libasan, libubsan) is not installed")
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "check_kernels_asan.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all kernel self-tests passed" in out.stdout
