"""`msbnb apply`'s options, each checked by what it changes: --on-violation, --dry-run, --dump, --config, --ckpt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from msbnb_pass import formats as fm

REPO = Path(__file__).resolve().parents[1]
# the BERT-like zoo network on 2 x 16 token ids: its 3-class classifier's NF4 error (0.1375) is above the NF4
# bound (0.13), every other layer is within it
BERT = ["tests.zoo:make_bert", "--input-dtype", "int32", "--input-max", "96"]


def msbnb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "msbnb_pass.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def actions(stdout: str) -> dict[str, str]:
    return {r["path"]: r["action"] for r in json.loads(stdout)["rewrites"]}


def test_on_violation_raise_keep_float_and_warn(tmp_path):
    raised = msbnb("apply", *BERT, "--rules", "nf4", "--input-shape", "2,16", "-o", "q.ckpt", cwd=tmp_path)
    assert raised.returncode != 0
    assert "classifier: verification failed (relative error 0.1375 > 0.13); the network is restored" in raised.stderr
    assert not (tmp_path / "q.ckpt").exists()  # a failed pass writes nothing

    kept = msbnb(
        "apply",
        *BERT,
        "--rules",
        "nf4",
        "--input-shape",
        "2,16",
        "--on-violation",
        "keep_float",
        "--json",
        cwd=tmp_path,
    )
    assert kept.returncode == 0, kept.stderr
    acts = actions(kept.stdout)
    assert acts.pop("classifier") == "kept_float" and set(acts.values()) == {"quantized"} and len(acts) == 13
    assert json.loads(kept.stdout)["report"]["passed"]

    warned = msbnb(
        "apply", *BERT, "--rules", "nf4", "--input-shape", "2,16", "--on-violation", "warn", "--json", cwd=tmp_path
    )
    assert warned.returncode == 0, warned.stderr
    assert actions(warned.stdout)["classifier"] == "quantized"
    report = json.loads(warned.stdout)["report"]
    layer = next(c for c in report["layers"] if c["path"] == "classifier")
    assert layer["action"] == "quantized (violation)" and not layer["passed"] and not report["passed"]
    assert "classifier: verification failed (relative error 0.1375 > 0.13)" in warned.stderr


def test_dry_run_plans_and_writes_nothing(tmp_path):
    out = msbnb(
        "apply",
        *BERT,
        "--rules",
        "nf4",
        "--input-shape",
        "2,7",
        "--dry-run",
        "--json",
        "-o",
        "q.ckpt",
        "--dump",
        "dumps",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["dry_run"] and set(actions(out.stdout).values()) == {"planned"} and len(result["rewrites"]) == 14
    assert not (tmp_path / "q.ckpt").exists()
    # the graph after a dry run is the graph before: nothing was rewritten
    assert result["graph_after"] == result["graph_before"]


def test_dump_writes_the_graph_before_and_after(tmp_path):
    out = msbnb("apply", *BERT, "--rules", "int8", "--input-shape", "2,7", "--dump", "dumps", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == sorted(f"{stage}.{ext}" for stage in ("before", "after") for ext in ("txt", "json", "dot"))
    before = (tmp_path / "dumps" / "before.txt").read_text()
    after = (tmp_path / "dumps" / "after.txt").read_text()
    assert "Linear8bit" not in before and after.count("Linear8bit") >= 14
    json.loads((tmp_path / "dumps" / "after.json").read_text())
    assert (tmp_path / "dumps" / "after.dot").read_text().startswith(("digraph", "strict digraph"))


def test_config_file_chooses_format_and_skips(tmp_path):
    config = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "llm_int8_skip_modules": ["pooler"],
    }
    (tmp_path / "bnb.json").write_text(json.dumps(config))
    out = msbnb(
        "apply", *BERT, "--config", "bnb.json", "--input-shape", "2,7", "--json", "--on-violation", "warn", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    rewrites = {r["path"]: r for r in json.loads(out.stdout)["rewrites"]}
    assert "pooler" not in rewrites and len(rewrites) == 13
    assert {r["scheme"] for r in rewrites.values()} == {"fp4"}


def test_ckpt_is_loaded_before_quantizing(tmp_path):
    import mindspore as ms

    from tests import zoo

    # a checkpoint whose weights differ from what the factory builds
    other = zoo.BertLike(seed=7)
    ms.save_checkpoint(other, str(tmp_path / "float.ckpt"))
    out = msbnb(
        "apply",
        *BERT,
        "--ckpt",
        "float.ckpt",
        "--rules",
        "nf4",
        "--input-shape",
        "2,7",
        "--on-violation",
        "warn",
        "-o",
        "q.ckpt",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    saved = ms.load_checkpoint(str(tmp_path / "q.ckpt"))
    w = other.encoder[0].query.weight.asnumpy()
    packed, state = fm.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    np.testing.assert_array_equal(saved["encoder.0.query.weight"].asnumpy().reshape(-1), packed.reshape(-1))
    np.testing.assert_array_equal(saved["encoder.0.query.weight_absmax"].asnumpy(), state.absmax)
