"""Shared test setup: quiet MindSpore, run every test in its own temporary directory (MindSpore writes
rank_0/ and kernel_meta/ into the working directory), and give tests the golden fixtures."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")

import numpy as np
import pytest
from hypothesis import settings

DATA = Path(__file__).resolve().parent / "data"

# Property tests draw the same examples on every run and machine (CI runs must not differ) and keep no
# example database in the working tree.
settings.register_profile("msbnb", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("msbnb")


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def bnb_golden() -> dict[str, np.ndarray]:
    """Arrays recorded from bitsandbytes 0.50 by tools/make_bnb_golden.py."""
    with np.load(DATA / "bnb_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def ms_cpu():
    """MindSpore, imported once and pointed at the CPU."""
    import mindspore as ms

    ms.set_device("CPU")
    return ms
