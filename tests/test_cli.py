"""The msbnb command line, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from msbnb_pass import __version__
from msbnb_pass.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msbnb_pass.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"msbnb_pass {__version__}"
    out = run("--help")
    assert out.returncode == 0 and "quantize" in out.stdout


def test_quantize_reports_bitsandbytes_level_error(capsys):
    assert main(["quantize", "--shape", "1024", "1024", "--format", "nf4", "--double-quant", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "nf4" and report["shape"] == [1024, 1024]
    assert 0.070 < report["mean_abs_error"] < 0.0738  # bitsandbytes' NF4 bs64 bound is 0.0728 + 1e-3
    assert abs(report["bits_per_weight"] - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4  # + the 4-byte offset
    assert main(["quantize", "--shape", "64", "128", "--format", "llm_int8"]) == 0
    assert "cosine_similarity" in capsys.readouterr().out


def test_quantize_from_npy_and_bad_input(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    assert main(["quantize", "--npy", str(tmp_path / "w.npy"), "--format", "int4", "--asymmetric", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [32, 64]
    np.save(tmp_path / "w3.npy", np.ones((2, 3, 4), np.float32))
    assert main(["quantize", "--npy", str(tmp_path / "w3.npy")]) == 2
    assert "the weight must be 2-D [out_features, in_features], got shape (2, 3, 4)" in capsys.readouterr().err
    assert main(["quantize", "--blocksize", "100"]) == 2
    assert "blocksize must be a power of two" in capsys.readouterr().err


def test_import_is_cheap_and_side_effect_free():
    code = "import sys, msbnb_pass, msbnb_pass.formats, msbnb_pass.config; print('mindspore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False"
