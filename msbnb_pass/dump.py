"""Renderings of a NetGraph with rewrite provenance: text tree, JSON (node-link), Graphviz DOT, and
MindSpore's own compiled IR of a network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx

from .errors import MsbnbError
from .graph import NetGraph
from .outputs import check_output_dir, write_text_atomic

FORMATS = ("text", "json", "dot")


def _provenance(result) -> dict[str, dict]:
    if result is None:
        return {}
    return {r.path: r.to_dict() for r in result.rewrites}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def to_text(graph: NetGraph, result=None) -> str:
    """An indented tree of cells; each rewritten layer marked with rule, format and bytes before/after."""
    g = graph.graph
    prov = _provenance(result)
    lines: list[str] = []

    def visit(cid: str, name: str, depth: int, seen: set[str]) -> None:
        d = g.nodes[cid]
        pad = "  " * depth
        extra = ""
        if d["path"] != name and depth and len(d["paths"]) > 1:
            extra = f"  (shared with {', '.join(p for p in d['paths'] if p != name)})"
        mark = ""
        rw = prov.get(d["path"])
        if rw:
            mark = (
                f"  [{rw['action']} by {rw['rule']}: {rw['scheme']}, "
                f"{_fmt_bytes(rw['bytes_before'])} -> {_fmt_bytes(rw['bytes_after'])}]"
            )
        src = "" if d.get("source") == "read" else f"  <source {d.get('source')}>"
        lines.append(f"{pad}{name.rpartition('.')[2] or '<root>'}: {d['type_name']}{mark}{extra}{src}")
        if cid in seen:
            return
        seen = seen | {cid}
        for attr, pid in graph.params_of(cid):
            p = g.nodes[pid]
            tied = f"  (tied: {', '.join(o + '.' + a for o, a in p['owners'][1:])})" if len(p["owners"]) > 1 else ""
            lines.append(f"{pad}  .{attr}: {p['dtype']}{list(p['shape'])} {_fmt_bytes(p['nbytes'])}{tied}")
        for call in graph.calls_of(cid):
            c = g.nodes[call]
            if c["callee"] == "primitive" and any(g.nodes[u]["kind"] == "param" for u, _ in g.in_edges(call)):
                rw = prov.get(c["path"])
                tag = f"  [{rw['action']} by {rw['rule']}: {rw['scheme']}]" if rw else ""
                lines.append(f"{pad}  call self.{c['attr']}(...): {c['op']} {c['prim_attrs']}{tag}")
        for attr, child in graph.children(cid):
            visit(child, f"{d['path']}.{attr}" if d["path"] else attr, depth + 1, seen)

    visit("", "", 0, set())
    return "\n".join(lines)


def to_json(graph: NetGraph, result=None) -> str:
    """networkx node-link JSON (``networkx.node_link_graph(json.loads(s), edges="edges")`` loads it back),
    with each rewritten node's provenance under ``rewrite``."""
    g = graph.graph.copy()
    prov = _provenance(result)
    for _, d in g.nodes(data=True):
        if d.get("kind") == "cell" and d.get("path") in prov:
            d["rewrite"] = prov[d["path"]]
    return json.dumps(nx.node_link_data(g, edges="edges"), indent=1, default=str)


def to_dot(graph: NetGraph, result=None) -> str:
    """Graphviz DOT: cells as boxes (rewritten ones filled), weights as ellipses, calls as plain text."""
    g = graph.graph
    prov = _provenance(result)

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = ["digraph netgraph {", "  rankdir=LR;", "  node [fontsize=10];"]
    for n, d in g.nodes(data=True):
        label = d.get("path") or "<root>"
        if d["kind"] == "cell":
            rw = prov.get(d["path"])
            style = ', style=filled, fillcolor="#c8e6c9"' if rw else ""
            text = f"{label}\\n{d['type_name']}" + (f"\\n{rw['scheme']} ({rw['rule']})" if rw else "")
            out.append(f"  {q(n)} [shape=box, label={q(text)}{style}];")
        elif d["kind"] == "param":
            out.append(
                f"  {q(n)} [shape=ellipse, label={q(label + chr(10) + str(d['shape']))}];".replace(chr(10), "\\n")
            )
        else:
            out.append(f"  {q(n)} [shape=plaintext, label={q(d['op'] + ' @' + (d['owner'] or '<root>'))}];")
    for u, v, d in g.edges(data=True):
        style = "" if d.get("kind") == "contains" else " [style=dashed]"
        out.append(f"  {q(u)} -> {q(v)}{style};")
    out.append("}")
    return "\n".join(out) + "\n"


def dump(graph: NetGraph, fmt: str = "text", result=None) -> str:
    if fmt not in FORMATS:
        raise MsbnbError(f"dump format must be one of {FORMATS}, got {fmt!r}")
    return {"text": to_text, "json": to_json, "dot": to_dot}[fmt](graph, result)


def write_dumps(result, directory: str | os.PathLike, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """before.<ext> and after.<ext> for every format into ``directory``; returns the files written."""
    out = check_output_dir(directory, "dump directory")
    out.mkdir(parents=True, exist_ok=True)
    ext = {"text": "txt", "json": "json", "dot": "dot"}
    written = []
    for fmt in formats:
        for which, graph in (("before", result.graph_before), ("after", result.graph_after)):
            path = out / f"{which}.{ext[fmt]}"
            write_text_atomic(path, dump(graph, fmt, result if which == "after" else None), "dump file")
            written.append(path)
    return written


def dump_ir(net: Any, inputs: Any, directory: str | os.PathLike) -> list[Path]:
    """Compile ``net`` in GRAPH_MODE on ``inputs`` with MindSpore's graph saving on and return the IR files
    it wrote into ``directory`` (the custom aot kernels appear in them as ``Custom`` nodes)."""
    import mindspore as ms

    out = check_output_dir(directory, "IR directory").resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = ms.get_context("mode")
    try:
        # save_graphs is the context form of MS_DEV_SAVE_GRAPHS (the environment variable is read only when
        # MindSpore starts)
        ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=str(out))
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        net(*args)
    finally:
        ms.set_context(mode=mode, save_graphs=0)
    return sorted(out.rglob("*.ir"))


class _CallableModule(type(os)):
    """``msbnb_pass.dump`` is both this module and, called, the function ``dump`` (see verify.py)."""

    def __call__(self, *args, **kwargs):
        return dump(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
