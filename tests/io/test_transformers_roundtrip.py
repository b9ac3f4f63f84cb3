"""Checkpoints travel both ways with transformers + bitsandbytes on PyTorch (tools/check_transformers.py).

PyTorch is not a dependency of this project (and not installed in CI), so this runs only where
MSBNB_TORCH_PYTHON names a Python that has torch, transformers and bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCH_PYTHON = os.environ.get("MSBNB_TORCH_PYTHON")
TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_transformers.py"


@pytest.mark.skipif(
    not TORCH_PYTHON,
    reason="set MSBNB_TORCH_PYTHON to a Python with torch, transformers and bitsandbytes to run this check",
)
def test_checkpoints_load_both_ways_with_transformers_and_bitsandbytes(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--torch-python", TORCH_PYTHON, "--kinds", "nf4+dq,llm.int8", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["ok"] and row["layers_ours"] == row["layers_theirs"] == 14, row
        assert row["identical"] == "14/14", row
    nf4 = [r for r in rows if r["kind"] == "nf4+dq"]
    assert all(r["max_weight_diff"] == 0.0 and r["ours_logit_diff"] <= r["logit_bound"] for r in nf4)
