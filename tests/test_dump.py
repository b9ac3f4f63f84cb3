"""Dumps of the graph before and after: text, JSON (loads back), DOT, and MindSpore's IR."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
from mindspore import Tensor

import msbnb_pass as mb
from msbnb_pass.dump import dump_ir, write_dumps

from . import zoo


def test_every_format_before_and_after(ms_cpu, tmp_path):
    net = zoo.make_llama()
    result = mb.apply(net, "nf4")
    files = write_dumps(result, tmp_path / "dumps")
    assert sorted(p.name for p in files) == [
        "after.dot",
        "after.json",
        "after.txt",
        "before.dot",
        "before.json",
        "before.txt",
    ]
    after = (tmp_path / "dumps" / "after.txt").read_text()
    assert "up_proj: Linear4bit  [quantized by nf4-linear: nf4, 32.00 KiB -> " in after
    assert "mm_q: QuantizedMatmul  [quantized by nf4-matmul: nf4, 16.00 KiB -> " in after
    before = (tmp_path / "dumps" / "before.txt").read_text()
    assert "up_proj: Dense" in before and ".weight: float32[128, 64] 32.00 KiB" in before
    assert "call self.mm_q(...): MatMul {'transpose_a': False, 'transpose_b': True}" in before
    for which, graph in (("before", result.graph_before), ("after", result.graph_after)):
        data = json.loads((tmp_path / "dumps" / f"{which}.json").read_text())
        back = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges")
        assert set(back.nodes) == set(graph.graph.nodes)
        assert sorted(back.edges(keys=True)) == sorted(graph.graph.edges(keys=True))
    data = json.loads((tmp_path / "dumps" / "after.json").read_text())
    rewritten = [n for n in data["nodes"] if "rewrite" in n]
    assert len(rewritten) == 14 and all(n["rewrite"]["scheme"] == "nf4" for n in rewritten)
    assert {n["type_name"] for n in rewritten} == {"Linear4bit", "QuantizedMatmul"}
    dot = (tmp_path / "dumps" / "after.dot").read_text()
    assert dot.startswith("digraph netgraph {") and dot.rstrip().endswith("}")
    assert 'fillcolor="#c8e6c9"' in dot and '"layers.0.mlp.up_proj" [shape=box' in dot
    assert mb.dump(result.graph_after, "text", result) == after


def test_compiled_ir_shows_the_custom_kernels(ms_cpu, tmp_path):
    net = zoo.make_bert()
    mb.apply(net, "nf4")
    files = dump_ir(net, (Tensor(np.zeros((2, 7), np.int32)),), tmp_path / "ir")
    assert len(files) > 10
    kernel = "MsbnbLinear4bit" if mb.kernels.get_backend() == "cpu" else "Gather"
    assert any(kernel in f.read_text(errors="ignore") for f in files)
    assert ms_cpu.get_context("mode") == ms_cpu.PYNATIVE_MODE  # restored


def test_bad_format(ms_cpu):
    import pytest

    with pytest.raises(ValueError, match=r"dump format must be one of \('text', 'json', 'dot'\), got 'svg'"):
        mb.dump(mb.build_graph(zoo.make_bert()), "svg")
