"""The msbnb commands that run the pass, on models given as package.module:factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def msbnb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "msbnb_pass.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


USER_RULES = """
# My Linear keeps its weight in self.w as [in, out] and computes x @ w + b.
[linear."tests.zoo.MyLinear"]
weight = "w"
bias = "b"
layout = "in_out"

[[rule]]
name = "my-linear-nf4"
pattern = "linear-cell"
priority = 100
where = { min_in_features = 64 }
rewrite = { to = "linear4bit", quant_type = "nf4", blocksize = 64, double_quant = true }
"""


def test_user_rule_for_a_custom_linear_class_end_to_end(tmp_path):
    (tmp_path / "my_rules.toml").write_text(USER_RULES)
    out = msbnb(
        "apply",
        "tests.zoo:make_uses_my_linear",
        "--rules",
        str(tmp_path / "my_rules.toml"),
        "--input-shape",
        "4,64",
        "-o",
        str(tmp_path / "q.ckpt"),
        "--json",
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [(r["path"], r["rule"], r["scheme"], r["action"]) for r in result["rewrites"]] == [
        ("a", "my-linear-nf4", "nf4", "quantized"),
        ("b", "my-linear-nf4", "nf4", "quantized"),
    ]
    assert result["report"]["passed"] and result["report"]["end_to_end"]["cosine"] > 0.99
    assert (tmp_path / "q.ckpt").stat().st_size < 64 * 128 * 2 * 4 / 4  # far below the float weights
    assert not list(REPO.glob("rank_0")) and not list(REPO.glob("*.ckpt"))  # nothing left in the checkout


def test_explain_dump_rules_verify(tmp_path):
    out = msbnb("explain", "tests.zoo:make_llama", "--rules", "nf4", "--layer", "ops.matmul", cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ops.matmul [call]: kept in full precision"
    assert "nf4-matmul: a functional call that cannot be rewritten in place" in out.stdout
    out = msbnb(
        "dump", "tests.zoo:make_bert", "--rules", "int8", "--format", "all", "-o", str(tmp_path / "d"), cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "after.dot",
        "after.json",
        "after.txt",
        "before.dot",
        "before.json",
        "before.txt",
    ]
    out = msbnb("dump", "tests.zoo:make_bert", "--format", "dot", cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("digraph netgraph {")
    out = msbnb("rules", "--json", cwd=REPO)
    assert len(json.loads(out.stdout)) == 15
    out = msbnb(
        "verify",
        "tests.zoo:make_bert",
        "--rules",
        "int8",
        "--input-shape",
        "2,7",
        "--input-dtype",
        "int32",
        "--input-max",
        "96",
        "--min-cosine",
        "0.999",
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "end to end: cosine 0.99" in out.stdout
    out = msbnb(
        "verify",
        "tests.zoo:make_bert",
        "--rules",
        "int4",
        "--input-shape",
        "2,7",
        "--input-dtype",
        "int32",
        "--input-max",
        "96",
        "--min-cosine",
        "0.99999",
        cwd=REPO,
    )
    assert out.returncode == 1 and "is below --min-cosine 0.99999" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("apply", "no_such_module:make", "--rules", "nf4"), "--model: cannot import 'no_such_module'"),
        (("apply", "tests.zoo:nothing", "--rules", "nf4"), "--model: module 'tests.zoo' has no attribute 'nothing'"),
        (("apply", "tests.zoo", "--rules", "nf4"), "--model must look like 'package.module:factory'"),
        (("apply", "tests.zoo:_w", "--rules", "nf4"), "--model: calling tests.zoo:_w() failed: TypeError"),
        (("apply", "tests.zoo:BUILTIN", "--rules", "nf4"), "has no attribute 'BUILTIN'"),
        (("apply", "tests.zoo:make_bert"), "say what to apply: --rules"),
        (("apply", "tests.zoo:make_bert", "--rules", "broken.toml"), "broken.toml: TOML syntax error"),
        (
            ("apply", "tests.zoo:make_bert", "--rules", "nf4", "--input-shape", "2,3,4"),
            "sample_inputs: running the network",
        ),
    ],
)
def test_cli_errors(tmp_path, args, message):
    (tmp_path / "broken.toml").write_text("[[rule]\n")
    args = tuple(str(tmp_path / a) if a.endswith(".toml") else a for a in args)
    out = msbnb(*args, cwd=REPO)
    assert out.returncode == 2
    assert message in out.stderr


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    import mindspore as ms
    from mindspore import nn

    from msbnb_pass.cli import save_checkpoint_atomic

    old = tmp_path / "model.ckpt"
    old.write_bytes(b"old checkpoint")

    def disk_full(net, path):
        Path(path).write_bytes(b"half a checkpo")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ms, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint_atomic(nn.Dense(2, 2), str(old))
    assert old.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
