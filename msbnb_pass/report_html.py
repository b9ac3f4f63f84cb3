"""A pass result as one self-contained HTML page: what ``PassResult.to_html`` and ``msbnb report`` write.

The page has a summary (layers rewritten, bytes before/after, end-to-end agreement), the rules that fired,
a per-layer error chart against each scheme's bound and memory bars by format (matplotlib, rendered to
inline SVG through its SVG backend), the verification table, the layers kept in full precision with the
reason, the warnings, and the network graph before and after as nested ``<details>`` trees (no script),
rewritten nodes coloured by format. Everything is inline: no external stylesheet, font, script or image,
so the file can be mailed or attached to a CI run. The result's ``to_dict()`` rides along as JSON.

matplotlib is imported only when a report is written, so ``import msbnb_pass`` stays light.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ._version import __version__
from .dump import _fmt_bytes
from .graph import NetGraph
from .outputs import check_output_file, write_text_atomic

__all__ = ["FORMAT_COLOURS", "render_html", "write_html"]

# one colour per storage format, shared by the charts, the tables and the graph trees
FORMAT_COLOURS = {
    "nf4": "#2563eb",
    "fp4": "#7c3aed",
    "int4": "#ea580c",
    "int4_asym": "#c2410c",
    "int8": "#059669",
    "int8_asym": "#0f766e",
    "llm_int8": "#db2777",
}
_EXTRA_COLOURS = ("#0891b2", "#65a30d", "#9333ea", "#b45309", "#4f46e5", "#be123c")
KEPT_COLOUR = "#6b7280"
FAIL_COLOUR = "#dc2626"
OTHER_COLOUR = "#cbd5e1"
FULL = "full precision"  # tag of a weight-holding layer no rule rewrote

OPEN_ALL_CELLS = 40  # a network with at most this many cells shows its whole tree open
OPEN_DEPTH = 3  # larger ones open only the top levels
BARS_LABELLED = 70  # above this many layers the error chart drops per-layer labels


def esc(value: Any) -> str:
    """HTML-escaped text (quotes too: the same helper fills attributes)."""
    return html.escape(str(value), quote=True)


def path_html(path: str) -> str:
    """A dotted path escaped, with a line-break opportunity after each dot (long paths wrap at dots only)."""
    return ".<wbr>".join(esc(part) for part in (path or "<root>").split("."))


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def scheme_colours(schemes: list[str]) -> dict[str, str]:
    """A colour for every scheme: the fixed ones, then the spare palette in sorted order."""
    out: dict[str, str] = {}
    spare = iter(_EXTRA_COLOURS * (1 + len(schemes) // len(_EXTRA_COLOURS)))
    for s in sorted(set(schemes)):
        out[s] = FORMAT_COLOURS.get(s) or next(spare)
    return out


def _num(x: float, fmt: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return format(x, fmt)


def _finite_json(obj: Any) -> Any:
    """to_dict() values with inf/NaN as strings, so the embedded JSON is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None or isinstance(obj, float):
        return obj
    if hasattr(obj, "item"):
        return _finite_json(obj.item())
    return str(obj)


def _param_total(graph: NetGraph) -> int:
    return sum(int(d.get("nbytes", 0)) for _, d in graph.graph.nodes(data=True) if d.get("kind") == "param")


# ---- charts (matplotlib -> inline SVG) --------------------------------------------------------------------------
def _svg(fig, salt: str) -> str:
    """The figure as an inline <svg> element: no XML prologue, no metadata, ids unique to this chart."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # matplotlib numbers its groups figure_1, patch_1, ... in every figure: make the ids (and the references to
    # them) unique in the page, which holds several charts
    text = re.sub(r'( id="|url\(#|href="#)', rf"\g<1>{salt}-", text)
    return f'<div class="chart" id="chart-{esc(salt)}">{text}</div>'


def _rc(salt: str) -> dict[str, Any]:
    return {
        "svg.fonttype": "none",  # text stays text: searchable, and the browser's font draws it
        "svg.hashsalt": f"msbnb-{salt}",  # deterministic element ids, distinct between the charts of one page
        "text.parse_math": False,  # a layer named a$b$ is not TeX
        "font.family": "sans-serif",
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": "#94a3b8",
        "axes.labelcolor": "#1f2937",
        "xtick.color": "#374151",
        "ytick.color": "#374151",
        "axes.grid": True,
        "grid.color": "#e5e7eb",
        "grid.linewidth": 0.6,
    }


def error_chart(checks: list, colours: dict[str, str]) -> str:
    """Relative error of every verified layer as a bar in its format's colour, the scheme's bound as a tick."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(checks)
    errs = [min(c.metrics["relative_error"], 10.0) for c in checks]  # an infinite error (zero output) drawn at 10
    bounds = [c.bound.max_rel_error for c in checks]
    fills = [colours[c.scheme] for c in checks]
    edges = [FAIL_COLOUR if not c.passed else "none" for c in checks]
    with matplotlib.rc_context(_rc("errors")):
        if n <= BARS_LABELLED:
            fig = Figure(figsize=(12.6, 0.9 + 0.2 * n))
            ax = fig.add_subplot()
            y = list(range(n))
            ax.barh(y, errs, color=fills, edgecolor=edges, linewidth=1.4, height=0.72, zorder=2)
            ax.scatter(bounds, y, marker="|", s=140, color="#111827", linewidths=1.6, zorder=3)
            ax.set_yticks(y, [c.path or "<root>" for c in checks], fontsize=8)
            ax.invert_yaxis()
            ax.set_ylim(n - 0.4, -0.6)
            ax.grid(axis="y", visible=False)
            ax.set_xlabel("relative RMS error  ||y_q - y|| / ||y||  on the probe inputs")
            ax.set_xlim(0, max([*errs, *bounds]) * 1.08)
        else:
            fig = Figure(figsize=(12.6, 3.6))
            ax = fig.add_subplot()
            x = list(range(n))
            ax.bar(x, errs, color=fills, edgecolor=edges, linewidth=0.8, width=0.85, zorder=2)
            ax.scatter(x, bounds, marker="_", s=30, color="#111827", linewidths=1.2, zorder=3)
            ax.grid(axis="x", visible=False)
            ax.set_xlabel("layer (in network order; the table below names them)")
            ax.set_ylabel("relative RMS error")
            ax.set_xlim(-0.8, n - 0.2)
        handles = [Patch(color=colours[s], label=s) for s in sorted({c.scheme for c in checks})]
        handles.append(Line2D([], [], color="#111827", marker="|" if n <= BARS_LABELLED else "_", ls="", ms=10))
        labels = [h.get_label() for h in handles[:-1]] + ["scheme bound"]
        if any(not c.passed for c in checks):
            handles.append(Patch(facecolor="white", edgecolor=FAIL_COLOUR, linewidth=1.4))
            labels.append("violation")
        ax.legend(handles, labels, loc="lower right", frameon=True, framealpha=0.95, fontsize=8)
        return _svg(fig, "errors")


def memory_chart(rows: list[tuple[str, dict[str, int]]], colours: dict[str, str]) -> str:
    """Stacked horizontal bars, one per state (before/after): the rewritten layers' bytes by format and
    every other parameter in grey."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cats = ["other parameters"] + sorted({k for _, seg in rows for k in seg if k != "other parameters"})
    unit, scale = _unit(max(sum(seg.values()) for _, seg in rows))
    with matplotlib.rc_context(_rc("memory")):
        fig = Figure(figsize=(8.2, 0.75 + 0.55 * len(rows)))
        ax = fig.add_subplot()
        for i, (_, seg) in enumerate(rows):
            left = 0.0
            for cat in cats:
                w = seg.get(cat, 0) / scale
                if w <= 0:
                    continue
                colour = OTHER_COLOUR if cat == "other parameters" else colours[cat]
                ax.barh(i, w, left=left, color=colour, height=0.6, zorder=2)
                left += w
            ax.text(left, i, f"  {left:.2f} {unit}", va="center", fontsize=9, color="#111827")
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        total = max(sum(seg.values()) for _, seg in rows) / scale
        ax.set_xlim(0, total * 1.18)
        ax.set_xlabel(f"parameter bytes ({unit})")
        handles = []
        for cat in cats:
            colour = OTHER_COLOUR if cat == "other parameters" else colours[cat]
            name = cat if cat == "other parameters" else f"{cat} layers"
            handles.append(Patch(color=colour, label=name))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(handles), frameon=False)
        return _svg(fig, "memory")


def _unit(n: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return unit, float(scale)
    return "B", 1.0


# ---- graph trees ---------------------------------------------------------------------------------------------------
def _subtree_counts(paths: dict[str, str]) -> dict[str, Counter]:
    """cell path -> Counter(tag) of the rewritten layers at or below it."""
    out: dict[str, Counter] = {}
    for path, tag in paths.items():
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            out.setdefault(".".join(parts[:i]), Counter())[tag] += 1
    return out


def _badge(tag: str, colours: dict[str, str], text: str | None = None, tip: str = "") -> str:
    title = f' title="{esc(tip)}"' if tip else ""
    if tag == FULL:
        return f'<span class="badge outline"{title}>{esc(text or tag)}</span>'
    colour = KEPT_COLOUR if tag == "kept float" else colours.get(tag, KEPT_COLOUR)
    return f'<span class="badge" style="background:{colour}"{title}>{esc(text or tag)}</span>'


def graph_tree(
    graph: NetGraph, tags: dict[str, tuple[str, str]], colours: dict[str, str], after: bool, open_all: bool
) -> str:
    """Nested <details> per cell: its parameters, its rewritten calls and its children. ``tags`` maps a
    rewritten path to (format or "kept float", rule); those nodes are coloured and, in the after graph, their
    internals start folded. ``open_all``: every cell starts unfolded (else only the top OPEN_DEPTH levels)."""
    g = graph.graph
    counts = _subtree_counts({p: t for p, (t, _) in tags.items() if t != FULL})
    out: list[str] = []

    def label(path: str) -> str:
        return path.rpartition(".")[2] or "<root>"

    def visit(cid: str, path: str, depth: int, seen: frozenset) -> None:
        d = g.nodes[cid]
        tag = tags.get(path)
        style = ""
        head = [
            f'<span class="nm" title="{esc(path or "<root>")}">{esc(label(path))}</span>',
            f'<span class="ty">{esc(d["type_name"])}</span>',
        ]
        if tag and tag[0] == FULL:
            head.append(_badge(FULL, colours, tip=tag[1]))
        elif tag:
            colour = KEPT_COLOUR if tag[0] == "kept float" else colours.get(tag[0], KEPT_COLOUR)
            style = f' style="border-left-color:{colour};background:{colour}14"'
            head.append(_badge(tag[0], colours))
            head.append(f'<span class="rule">{esc(tag[1])}</span>')
        else:
            below = counts.get(path)
            if below:
                head.append(
                    '<span class="cnt">'
                    + " ".join(_badge(t, colours, f"{n} {t}") for t, n in sorted(below.items()))
                    + "</span>"
                )
        if len(d["paths"]) > 1:
            others = [p for p in d["paths"] if p != path]
            head.append(f'<span class="note">shared with {esc(", ".join(p or "<root>" for p in others))}</span>')
        if d.get("source") not in (None, "read"):
            head.append(f'<span class="note">source {esc(d.get("source"))}</span>')
        body: list[str] = []
        if cid not in seen:
            for attr, pid in graph.params_of(cid):
                p = g.nodes[pid]
                shape = ", ".join(str(s) for s in p["shape"])
                tied = " (tied)" if len(p["owners"]) > 1 else ""
                body.append(
                    f'<li class="param">.{esc(attr)} <span class="ty">{esc(p["dtype"])}[{esc(shape)}]</span> '
                    f'<span class="bytes">{esc(_fmt_bytes(p["nbytes"]))}{tied}</span></li>'
                )
            for call in graph.calls_of(cid):
                c = g.nodes[call]
                ctag = tags.get(c["path"])
                reads = any(g.nodes[u]["kind"] == "param" for u, _ in g.in_edges(call))
                if c["callee"] not in ("primitive", "function") or not (ctag or (c["callee"] == "primitive" and reads)):
                    continue  # a child cell's call is that child's node; a plain primitive touches no weight
                if tag and not ctag:  # the inner matmul of a rewritten Linear-like cell: the cell says it all
                    continue
                if not ctag:
                    badge = ""
                elif ctag[0] == FULL:
                    badge = _badge(FULL, colours, tip=ctag[1])
                else:
                    badge = _badge(ctag[0], colours) + f' <span class="rule">{esc(ctag[1])}</span>'
                cstyle = ""
                if ctag and ctag[0] != FULL:
                    colour = KEPT_COLOUR if ctag[0] == "kept float" else colours.get(ctag[0], KEPT_COLOUR)
                    cstyle = f' style="border-left-color:{colour};background:{colour}14"'
                callee = f"self.{c['attr']}" if c["attr"] else c["func"]
                body.append(
                    f'<li class="call" data-path="{esc(c["path"])}"{cstyle}>call {esc(callee)}(…) <span class="ty">{esc(c["op"])}</span> '
                    f"{badge}</li>"
                )
            children = graph.children(cid)
        else:
            children = []
        if not children and not body:
            out.append(f'<li class="leaf" data-path="{esc(path)}"{style}>{" ".join(head)}</li>')
            return
        is_open = (open_all or depth < OPEN_DEPTH) and not (after and tag)
        out.append(
            f'<li data-path="{esc(path)}"><details{" open" if is_open else ""}><summary{style}>{" ".join(head)}</summary><ul>'
        )
        out.extend(body)
        for attr, child in children:
            visit(child, f"{path}.{attr}" if path else attr, depth + 1, seen | {cid})
        out.append("</ul></details></li>")

    visit("", "", 0, frozenset())
    return '<ul class="tree">' + "".join(out) + "</ul>"


# ---- the page ------------------------------------------------------------------------------------------------------
CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --card:#ffffff; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
header { background:#0f172a; color:#f8fafc; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#cbd5e1; font-size:13px; }
nav { background:#1e293b; padding:8px 32px; font-size:13px; }
nav a { color:#cbd5e1; text-decoration:none; margin-right:18px; }
nav a:hover { color:#fff; }
main { max-width:1360px; margin:0 auto; padding:20px 32px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px 22px; margin:0 0 18px; }
h2 { font-size:17px; margin:0 0 12px; font-weight:600; }
h3 { font-size:14px; margin:0 0 8px; font-weight:600; color:#374151; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(220px, 1fr)); gap:12px; margin-bottom:18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:17px; font-weight:600; margin-top:2px; }
.card .d { color:var(--muted); font-size:12.5px; margin-top:2px; }
.card.ok { border-top:3px solid #16a34a; } .card.bad { border-top:3px solid #dc2626; }
.card.info { border-top:3px solid #2563eb; }
table { border-collapse:collapse; width:100%; font-size:12.5px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f1f5f9; font-weight:600; color:#374151; position:sticky; top:0; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.nw, th.nw { white-space:nowrap; }
table.vt { font-size:12px; } table.vt th, table.vt td { padding:5px 6px; }
.tablewrap { overflow-x:auto; }
td.path { font-family:ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; font-size:12px; }
tr.viol td { background:#fef2f2; }
tr.keptf td { background:#f9fafb; color:#4b5563; }
tr.total td { font-weight:600; background:#f8fafc; }
.badge.outline { background:#fff; color:#6b7280; border:1px solid #9ca3af; line-height:15px; }
.badge { display:inline-block; color:#fff; border-radius:4px; padding:0 6px; font-size:11px; font-weight:600;
  line-height:17px; white-space:nowrap; }
.pass { color:#15803d; font-weight:600; } .fail { color:#b91c1c; font-weight:600; }
.bar { display:inline-block; height:7px; border-radius:3px; vertical-align:middle; margin-left:6px; }
.muted { color:var(--muted); }
.chart svg { width:100%; height:auto; display:block; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
.legend { margin:0 0 10px; font-size:12.5px; color:#374151; }
.legend .badge { margin-right:4px; }
.legend span.item { margin-right:14px; white-space:nowrap; }
.treebox { overflow:auto; max-height:900px; border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
ul.tree, ul.tree ul { list-style:none; margin:0; padding-left:16px; }
ul.tree { padding-left:0; font:12px/1.6 ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; }
ul.tree ul { border-left:1px dotted #cbd5e1; margin-left:5px; }
ul.tree summary, ul.tree li.leaf, ul.tree li.call { border-left:3px solid transparent; padding-left:4px;
  white-space:nowrap; }
ul.tree summary { cursor:pointer; }
ul.tree .nm { font-weight:600; } ul.tree .ty { color:#475569; } ul.tree .bytes { color:#94a3b8; }
ul.tree li.param { color:#64748b; padding-left:7px; white-space:nowrap; }
ul.tree .rule, ul.tree .note { color:#94a3b8; font-size:11px; margin-left:4px; }
ul.tree .cnt .badge { opacity:.85; margin-left:2px; }
ul.warn { margin:0; padding-left:20px; } ul.warn li { margin:3px 0; }
@media print { nav { display:none; } .treebox { max-height:none; overflow:visible; } section { break-inside:avoid; } }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 24px; }
"""


def render_html(result: Any, *, title: str | None = None) -> str:
    """The report page of a ``PassResult`` as a string (see the module docstring for its contents)."""
    rewrites = sorted(result.rewrites, key=lambda r: _natural_key(r.path))
    checks = {c.path: c for c in result.report.layers}
    schemes = sorted({r.scheme for r in rewrites} | {c.scheme for c in result.report.layers})
    colours = scheme_colours(schemes)
    root = result.graph_before.node("")["type_name"] if "" in result.graph_before.graph else "network"
    title = title or f"msbnb_pass report: {root}"
    done = [r for r in rewrites if r.action in ("quantized", "planned")]
    kept_float = [r for r in rewrites if r.action == "kept_float"]
    before_q = sum(r.bytes_before for r in done)
    after_q = sum(r.bytes_after for r in done)
    total_before = _param_total(result.graph_before)
    total_after = total_before if result.dry_run else _param_total(result.graph_after)

    parts: list[str] = []
    sections = [
        ("summary", "Summary"),
        ("rules", "Rules"),
        ("errors", "Layer errors"),
        ("memory", "Memory"),
        ("verification", "Verification"),
        ("kept", "Kept layers"),
        ("warnings", "Warnings"),
        ("graph", "Graph"),
    ]
    nav = "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in sections)
    verb = "dry run: would rewrite" if result.dry_run else "rewrote"
    parts.append(
        f"<header><h1>{esc(title)}</h1><div class=sub>{esc(verb)} {len(done)} of "
        f"{len(result.trace.decisions)} weight-holding layers · msbnb_pass {esc(__version__)} · "
        f"{esc(_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}</div></header><nav>{nav}</nav><main>"
    )

    # summary cards
    cards = []
    by_scheme = Counter(r.scheme for r in done)
    cards.append(
        _card(
            "info",
            "layers rewritten" if not result.dry_run else "layers planned",
            f"{len(done)}",
            ", ".join(f"{n} {s}" for s, n in sorted(by_scheme.items()))
            + (f"; {len(kept_float)} kept in float" if kept_float else "")
            + f"; {len(result.kept)} weight-holding layer(s) left in full precision",
        )
    )
    if before_q:
        bits = 8 * after_q / (before_q / 4) if not result.dry_run else None
        cards.append(
            _card(
                "info",
                "rewritten weights",
                f"{_fmt_bytes(before_q)} → {_fmt_bytes(after_q)}" if not result.dry_run else _fmt_bytes(before_q),
                f"{after_q / before_q:.3f}× · {bits:.2f} bits per float32 weight"
                if bits is not None
                else "float bytes the rules would rewrite",
            )
        )
    cards.append(
        _card(
            "info",
            "all parameters",
            _fmt_bytes(total_before) if result.dry_run else f"{_fmt_bytes(total_before)} → {_fmt_bytes(total_after)}",
            "every parameter of the network"
            if result.dry_run or not total_before
            else f"{total_after / total_before:.3f}× of the float network",
        )
    )
    e2e = result.report.end_to_end
    if e2e:
        cos = e2e["cosine"]
        cards.append(
            _card(
                "info",
                "end to end (sample inputs)",
                f"cosine {_num(cos, '.6f')}",
                f"relative error {_num(e2e['relative_error'], '.4f')} · SQNR {_num(e2e['sqnr_db'], '.1f')} dB "
                f"over {e2e.get('outputs', 1)} output(s)",
            )
        )
    else:
        cards.append(
            _card("info", "end to end", "not measured", "pass sample_inputs (--input-shape) to compare outputs")
        )
    layers = result.report.layers
    if layers:
        viol = result.report.violations
        worst = max(layers, key=lambda c: c.metrics["relative_error"])
        cards.append(
            _card(
                "ok" if not viol else "bad",
                "verification",
                "passed" if not viol else f"{len(viol)} violation(s)",
                f"{len(layers)} layer(s) checked; worst relative error "
                f"{_num(worst.metrics['relative_error'], '.4f')} at {worst.path or '<root>'}",
            )
        )
    else:
        cards.append(_card("info", "verification", "not run", "dry run" if result.dry_run else "verify=False"))
    parts.append(f'<div class="cards" id="summary">{"".join(cards)}</div>')

    # rules
    fired = Counter(r.rule for r in done)
    kept_by = Counter(r.rule for r in kept_float)
    rule_rows = list(result.rules) or [{"name": n, "scheme": "", "source": "", "replacement": ""} for n in fired]
    trs = []
    for row in sorted(rule_rows, key=lambda r: (-fired.get(r["name"], 0), r["name"])):
        n = fired.get(row["name"], 0)
        scheme = row.get("scheme", "")
        trs.append(
            f"<tr{' class=keptf' if not n else ''}><td class=path>{esc(row['name'])}</td>"
            f"<td>{_badge(scheme, colours) if scheme and n else esc(scheme)}</td>"
            f"<td>{esc(row.get('replacement', ''))}</td><td class=n>{n}</td>"
            f"<td class=n>{kept_by.get(row['name'], 0) or ''}</td>"
            f"<td class=path>{esc(row.get('source', ''))}</td><td>{esc(row.get('description', ''))}</td></tr>"
        )
    parts.append(
        '<section id="rules"><h2>Rules</h2>'
        + (
            "<table><thead><tr><th>rule</th><th>format</th><th>replacement</th><th class=n>layers</th>"
            "<th class=n>kept float</th><th>source</th><th>description</th></tr></thead><tbody>"
            + "".join(trs)
            + "</tbody></table><p class=muted>Rules that rewrote no layer are shown greyed.</p>"
            if trs
            else "<p class=muted>No rules.</p>"
        )
        + "</section>"
    )

    # charts
    ordered_checks = sorted(layers, key=lambda c: _natural_key(c.path))
    if ordered_checks:
        chart = error_chart(ordered_checks, colours)
        parts.append(
            '<section id="errors"><h2>Per-layer error</h2><p class=muted>Relative RMS error of each rewritten '
            "layer's output against its float original on the probe inputs (captured activations when sample "
            "inputs were given), in the colour of its format; the black tick is the scheme's bound.</p>"
            f"{chart}</section>"
        )
    else:
        parts.append('<section id="errors"><h2>Per-layer error</h2><p class=muted>No layer was verified.</p></section>')
    other = max(0, total_before - sum(r.bytes_before for r in done))
    mem_rows = [("before", {"other parameters": other, **_by_scheme(done, "bytes_before")})]
    if not result.dry_run:
        mem_rows.append(("after", {"other parameters": other, **_by_scheme(done, "bytes_after")}))
    before_by, after_by = _by_scheme(done, "bytes_before"), _by_scheme(done, "bytes_after")
    plan = result.dry_run  # a plan has no size after

    def mem_row(head: str, n: Any, b: int, a: int, ratio: bool, cls: str = "") -> str:
        after = "–" if plan else esc(_fmt_bytes(a))
        r = f"{a / b:.3f}×" if ratio and b and not plan else ""
        return (
            f"<tr{cls}><td>{head}</td><td class=n>{n}</td><td class=n>{esc(_fmt_bytes(b))}</td>"
            f"<td class=n>{after}</td><td class=n>{r}</td></tr>"
        )

    mem_table = "".join(
        mem_row(_badge(s, colours), by_scheme[s], before_by[s], after_by[s], True) for s in sorted(by_scheme)
    )
    mem_table += mem_row("other parameters", "", other, other, False)
    mem_table += mem_row("whole network", len(done), total_before, total_after, True, " class=total")
    parts.append(
        '<section id="memory"><h2>Memory</h2><div class=grid2 style="grid-template-columns:3fr 2fr">'
        + (memory_chart(mem_rows, colours) if total_before else "<p class=muted>The network has no parameters.</p>")
        + "<div><table><thead><tr><th>format</th><th class=n>layers</th><th class=n>before</th>"
        "<th class=n>after</th><th class=n>ratio</th></tr></thead><tbody>"
        + mem_table
        + "</tbody></table><p class=muted>Bytes of the parameters each rewritten layer held before (float weight "
        "and bias) and holds after (packed codes, scales, bias); the whole network's totals are every parameter "
        "of the graph before and after.</p></div></div></section>"
    )

    # verification table
    parts.append(_verification_table(rewrites, checks, colours, e2e))

    # kept layers
    if result.kept:
        rows = "".join(f"<tr><td class=path>{path_html(p)}</td><td>{esc(why)}</td></tr>" for p, why in result.kept)
        kept_html = f"<table><thead><tr><th>layer</th><th>why it stays in full precision</th></tr></thead><tbody>{rows}</tbody></table>"
    else:
        kept_html = "<p class=muted>Every weight-holding layer was rewritten.</p>"
    parts.append(f'<section id="kept"><h2>Kept in full precision ({len(result.kept)})</h2>{kept_html}</section>')

    warnings = list(result.warnings) + [
        f"{c.path or '<root>'}: {c.failure()}" for c in layers if not c.passed and c.action != "kept_float"
    ]
    warn_html = (
        '<ul class="warn">' + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else "<p class=muted>None.</p>"
    )
    parts.append(f'<section id="warnings"><h2>Warnings ({len(warnings)})</h2>{warn_html}</section>')

    # graphs
    tags = {r.path: ("kept float" if r.action == "kept_float" else r.scheme, r.rule) for r in rewrites}
    for path, why in result.kept:
        tags.setdefault(path, (FULL, why))
    legend = " ".join(f'<span class="item">{_badge(s, colours)}</span>' for s in schemes)
    legend += f' <span class="item">{_badge("kept float", colours)} verification kept it in float</span>'
    legend += f' <span class="item">{_badge(FULL, colours)} no rule rewrote it (hover for why)</span>'
    legend += (
        ' <span class="item muted">badges on a folded cell count the rewritten layers inside it; '
        "click a cell to fold or unfold it</span>"
    )
    after_title = "before (the plan)" if result.dry_run else "before"
    n_cells = sum(1 for _, d in result.graph_before.graph.nodes(data=True) if d.get("kind") == "cell")
    open_all = n_cells <= OPEN_ALL_CELLS
    parts.append(
        '<section id="graph"><h2>Network graph</h2>'
        f'<div class="legend">{legend}</div><div class="grid2">'
        f'<div><h3>{esc(after_title)}</h3><div class="treebox">{graph_tree(result.graph_before, tags, colours, False, open_all)}'
        "</div></div>"
        + (
            f'<div><h3>after</h3><div class="treebox">{graph_tree(result.graph_after, tags, colours, True, open_all)}</div></div>'
            if not result.dry_run
            else ""
        )
        + "</div></section>"
    )

    data = json.dumps(_finite_json(result.to_dict()), indent=None, sort_keys=False).replace("<", "\\u003c")
    parts.append(
        f"</main><footer>msbnb_pass {esc(__version__)} · the pass result as JSON is embedded in this file "
        f'(script id "msbnb-result")</footer>'
        f'<script type="application/json" id="msbnb-result">{data}</script>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>\n"
    )


def _card(kind: str, key: str, value: str, detail: str) -> str:
    value = re.sub(r"(\d) (B|KiB|MiB|GiB)\b", "\\1\u00a0\\2", value)  # a number keeps its unit on its line
    return (
        f'<div class="card {kind}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
        f'<div class="d">{esc(detail)}</div></div>'
    )


def _by_scheme(rewrites: list, attr: str) -> Counter:
    out: Counter = Counter()
    for r in rewrites:
        out[r.scheme] += getattr(r, attr)
    return out


def _verification_table(rewrites: list, checks: dict, colours: dict[str, str], e2e: dict | None) -> str:
    head = (
        "<tr><th>layer</th><th>rule</th><th>format</th><th>probe</th><th class=n>rel. error</th>"
        "<th class=n>cosine</th><th class=n>SQNR dB</th><th class=nw title='relative error ≤, cosine ≥'>bound</th>"
        "<th class=nw title='worst error as a multiple of the fp32 rounding bound'>kernel</th><th class=n>bytes</th><th>action</th></tr>"
    )
    rows = []
    for r in rewrites:
        c = checks.get(r.path)
        cls = ""
        if c is not None and not c.passed:
            cls = " class=viol" if r.action != "kept_float" else " class=keptf"
        elif r.action == "kept_float":
            cls = " class=keptf"
        if c is not None:
            m = c.metrics
            frac = min(m["relative_error"] / c.bound.max_rel_error, 1.0) if c.bound.max_rel_error > 0 else 1.0
            colour = FAIL_COLOUR if m["relative_error"] > c.bound.max_rel_error else colours.get(c.scheme, KEPT_COLOUR)
            bar = f'<span class="bar" style="width:{frac * 48:.0f}px;background:{colour}"></span>'
            ker = (
                f'<span class="pass">ok</span> <span class=muted>{c.kernel_worst_ratio:.2g}×</span>'
                if c.kernel_ok
                else f'<span class="fail">FAIL</span> {c.kernel_worst_ratio:.3g}×'
            )
            cos_cls = " fail" if m["cosine"] < c.bound.min_cosine else ""
            metrics = (
                f"<td>{esc(c.probe)}</td><td class=n>{_num(m['relative_error'], '.4f')}{bar}</td>"
                f'<td class="n{cos_cls}">{_num(m["cosine"], ".6f")}</td><td class=n>{_num(m["sqnr_db"], ".2f")}</td>'
                f"<td class=nw>≤ {_num(c.bound.max_rel_error, 'g')}, ≥ {_num(c.bound.min_cosine, 'g')}</td>"
                f"<td class=nw>{ker}</td>"
            )
            action = c.action
        else:
            metrics = '<td class=muted colspan="6">not verified</td>'
            action = r.action
        why = f' title="{esc(r.reason)}"' if r.reason else ""  # the kept-layers table spells it out
        rows.append(
            f"<tr{cls}><td class=path>{path_html(r.path)}</td><td class='path nw'>{esc(r.rule)}</td>"
            f"<td>{_badge(r.scheme, colours)}</td>{metrics}"
            f"<td class=n>{esc(_fmt_bytes(r.bytes_before))} → {'–' if r.action == 'planned' else esc(_fmt_bytes(r.bytes_after))}</td>"
            f"<td class=nw{why}>{esc(action)}</td></tr>"
        )
    if e2e:
        rows.append(
            f"<tr class=total><td>end to end</td><td></td><td></td><td class=nw>sample inputs</td>"
            f"<td class=n>{_num(e2e['relative_error'], '.4f')}</td><td class=n>{_num(e2e['cosine'], '.6f')}</td>"
            f"<td class=n>{_num(e2e['sqnr_db'], '.2f')}</td><td colspan=4>{e2e.get('outputs', 1)} output(s)</td></tr>"
        )
    body = "".join(rows) if rows else '<tr><td colspan="11" class=muted>No layer was rewritten.</td></tr>'
    return (
        '<section id="verification"><h2>Verification</h2><p class=muted>Each rewritten layer against its float '
        "original (relative RMS error and cosine vs the scheme's bound, SQNR) and its kernel against the float64 "
        "reference computation with the dequantized weight (worst error as a multiple of the fp32 rounding "
        "bound; ≤ 1 passes).</p>"
        f'<div class="tablewrap"><table class="vt"><thead>{head}</thead><tbody>{body}</tbody></table></div></section>'
    )


def write_html(result: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Render the report and write it to ``path`` atomically (a failed write leaves an old file intact)."""
    check_output_file(path, "HTML report")  # before the rendering work
    return write_text_atomic(path, render_html(result, title=title), "HTML report")
