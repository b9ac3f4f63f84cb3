"""The tutorial in docs/ runs as written: its files are written to a temporary directory and its commands
run there (``msbnb`` through this interpreter), and what the text says about the results is checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|run) -->\n```\w*\n(?P<body>.*?)\n```", re.S)


def blocks(doc: str) -> tuple[dict[str, str], list[str]]:
    """The ``<!-- file: NAME -->`` blocks (name -> text) and the ``<!-- run -->`` command lines, in order."""
    files, commands = {}, []
    for m in BLOCK.finditer((DOCS / doc).read_text()):
        if m["name"]:
            files[m["name"]] = m["body"] + "\n"
        else:
            commands += [line for line in m["body"].splitlines() if line.strip()]
    return files, commands


def run(command: str, cwd: Path) -> str:
    argv = shlex.split(command)
    if argv[0] == "msbnb":
        argv = [sys.executable, "-m", "msbnb_pass.cli", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_tutorial_runs_as_written(tmp_path):
    files, commands = blocks("tutorial.md")
    assert set(files) == {"mymodel.py", "my_rules.toml", "my_mixed_rules.toml", "quantize_mymodel.py"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = {command: run(command, tmp_path) for command in commands}
    assert len(out) == 4
    before = out["msbnb explain mymodel:make_model --rules nf4"]
    assert "head [cell]: rewritten by rule 'nf4-linear'" in before
    assert "up" in before and "rewritten by rule 'mylinear" not in before
    after = out["msbnb explain mymodel:make_model --rules my_rules.toml"]
    assert "up [cell]: rewritten by rule 'mylinear-nf4'" in after
    assert "down [cell]: rewritten by rule 'mylinear-nf4'" in after
    applied = out["msbnb apply mymodel:make_model --rules my_rules.toml --input-shape 8,256"]
    assert "rewrote 2 layer(s)" in applied and "mylinear-nf4: 2" in applied
    lines = dict(line.split(": ", 1) for line in out["python quantize_mymodel.py"].splitlines())
    nf4, mixed = lines["all NF4"], lines["NF4 or INT8"]
    assert nf4.startswith("{'up': 'Linear4bit', 'down': 'Linear4bit'}")
    assert mixed.startswith("{'up': 'Linear4bit', 'down': 'Linear8bit'}")
    cos = [float(re.search(r"cosine to the float network ([0-9.]+)", t)[1]) for t in (nf4, mixed)]
    size = [int(re.search(r"(\d+) bytes", t)[1]) for t in (nf4, mixed)]
    assert 0.99 < cos[0] < cos[1] <= 1.0 and 1.3 < size[1] / size[0] < 1.6, (cos, size)


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_docs_link_only_to_files_that_exist(doc):
    text = (DOCS / doc).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (DOCS / target).exists(), f"{doc} links to {target}, which does not exist"


def test_the_cli_reference_is_generated_from_the_parser():
    tools = Path(__file__).resolve().parents[1] / "tools"
    proc = subprocess.run(
        [sys.executable, str(tools / "gen_cli_docs.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
