"""The HTML report (PassResult.to_html, msbnb report / apply --html): its contents checked against the pass
result it renders, self-containment, escaping, the atomic write, and a real browser rendering it.

The browser test runs where Debian's Chromium is installed (``apt-get install chromium``) and skips elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import msbnb_pass as mb
from msbnb_pass.cli import main
from msbnb_pass.dump import _fmt_bytes
from msbnb_pass.outputs import OutputError
from msbnb_pass.report_html import FORMAT_COLOURS
from msbnb_pass.rules import Rule, RuleSet
from tests import zoo
from tests.zoo import _dense

NF4 = FORMAT_COLOURS["nf4"]
SECTIONS = {"rules", "errors", "memory", "verification", "kept", "warnings", "graph"}
BERT_ARGS = ["tests.zoo:make_bert", "--rules", "nf4", "--input-shape", "2,16", "--input-dtype", "int32"]
BERT_ARGS += ["--input-max", "96"]


class Page(HTMLParser):
    """Every tag's attributes, the rows of each section's tables (cell texts and the row's class) and the
    text of the embedded JSON."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str, list[tuple[str | None, list[str]]]] = {}
        self.section: str | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.row_class: str | None = None
        self.in_json = False
        self.json = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self.section = a.get("id")
        elif tag == "tr":
            self.row, self.row_class = [], a.get("class")
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
        elif tag == "br" and self.cell is not None:
            self.cell.append(" ")
        elif tag == "script" and a.get("id") == "msbnb-result":
            self.in_json = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.setdefault(self.section, []).append((self.row_class, self.row))
            self.row = None
        elif tag == "section":
            self.section = None
        elif tag == "script":
            self.in_json = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_json:
            self.json += data

    def table(self, section: str) -> dict[str, tuple[str | None, list[str]]]:
        """Body rows of a section's table by their first cell."""
        return {cells[0]: (cls, cells) for cls, cells in self.rows.get(section, []) if cells and cells[0] != "layer"}


def _bert_result(on_violation="warn", dry_run=False):
    net = zoo.make_bert()
    ids = ms.Tensor(np.random.default_rng(0).integers(0, 96, (2, 16)).astype(np.int32))
    return mb.apply(net, "nf4", sample_inputs=ids, on_violation=on_violation, dry_run=dry_run)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The BERT-like zoo network quantized NF4 on 2 x 16 token ids (its classifier exceeds the NF4 bound,
    kept as a flagged violation) and its report."""
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("bert"))  # MindSpore writes into the working directory
    try:
        result = _bert_result()
        path = result.to_html(Path("report.html"))
        text = path.read_text(encoding="utf-8")
    finally:
        os.chdir(cwd)
    return result, text


def test_report_tables_charts_and_graph_match_the_result(bert):
    result, text = bert
    page = Page(text)
    assert {a["id"] for t, a in page.tags if t == "section"} == SECTIONS
    quantized = {r.path: r for r in result.rewrites}
    assert len(quantized) == 14

    # the verification table: one row per rewritten layer with its measured numbers, then the end-to-end row
    rows = page.table("verification")
    assert set(rows) == set(quantized) | {"end to end"}
    for check in result.report.layers:
        cls, cells = rows[check.path]
        m = check.metrics
        assert cells[1] == "nf4-linear" and cells[2] == "nf4" and cells[3] == "captured"
        assert cells[4] == f"{m['relative_error']:.4f}" and cells[5] == f"{m['cosine']:.6f}"
        assert cells[6] == f"{m['sqnr_db']:.2f}" and cells[7] == "≤ 0.13, ≥ 0.99"
        assert cells[8] == f"ok {check.kernel_worst_ratio:.2g}×"
        r = quantized[check.path]
        assert cells[9] == f"{_fmt_bytes(r.bytes_before)} → {_fmt_bytes(r.bytes_after)}"
        assert (cls, cells[10]) == (
            ("viol", "quantized (violation)") if check.path == "classifier" else (None, "quantized")
        )
    assert rows["classifier"][1][4] == "0.1375"  # above the NF4 bound 0.13: the one violation
    e2e = result.report.end_to_end
    assert rows["end to end"][1][4:8] == [
        f"{e2e['relative_error']:.4f}",
        f"{e2e['cosine']:.6f}",
        f"{e2e['sqnr_db']:.2f}",
        "1 output(s)",
    ]

    # rules that fired, with the file:line they come from; kept layers with their reasons; the violation warned
    rules = page.table("rules")
    fired = {r["name"]: r for r in result.rules}
    assert rules["nf4-linear"][1][3] == "14" and rules["nf4-linear"][1][5] == fired["nf4-linear"]["source"]
    assert fired["nf4-linear"]["source"].startswith("rules/nf4.toml:")
    assert rules["nf4-matmul"][1][3] == "0" and rules["nf4-matmul"][0] == "keptf"
    assert [(k, c[1]) for k, (_, c) in page.table("kept").items()] == result.kept
    assert len(result.kept) == 2
    assert f"<li>{escape('classifier: relative error 0.1375 > 0.13')}</li>" in text

    # the memory table's numbers are the rewrites' bytes and the graphs' parameter totals
    mem = page.table("memory")
    before = sum(r.bytes_before for r in result.rewrites)
    after = sum(r.bytes_after for r in result.rewrites)
    assert mem["nf4"][1][1:4] == ["14", _fmt_bytes(before), _fmt_bytes(after)]
    total = sum(d["nbytes"] for _, d in result.graph_before.graph.nodes(data=True) if d["kind"] == "param")
    assert mem["whole network"][1][2] == _fmt_bytes(total)

    # two inline SVG charts; the error chart has one clipped bar per layer in NF4's colour, one outlined red
    assert [a.get("id") for t, a in page.tags if t == "div" and a.get("class") == "chart"] == [
        "chart-errors",
        "chart-memory",
    ]
    assert sum(1 for t, _ in page.tags if t == "svg") == 2
    errors_svg = text[text.index('id="chart-errors"') : text.index("</svg>", text.index('id="chart-errors"'))]
    bars = re.findall(
        r'<path [^>]*clip-path="[^"]+" style="fill: (#[0-9a-f]{6})(?:; stroke: (#[0-9a-f]{6}))?', errors_svg
    )
    assert len(bars) == 14 and {f for f, _ in bars} == {NF4}
    assert sorted(s for _, s in bars).count("#dc2626") == 1
    for label in [c.path for c in result.report.layers]:
        assert f">{label}</text>" in errors_svg

    # the graph before and after: every rewritten layer is a node coloured by its format in both trees
    for path in quantized:
        nodes = re.findall(
            rf'<li data-path="{re.escape(escape(path))}"><details[^>]*><summary style="border-left-color:{NF4}',
            text,
        )
        assert len(nodes) == 2, path
    assert f'<span class="badge" style="background:{NF4}">nf4</span>' in text[text.index('id="graph"') :]
    assert '<li data-path="encoder"><details open><summary><span class="nm" title="encoder">encoder</span>' in text
    # a small network's trees start unfolded, except the rewritten cells of the after graph (their internals)
    assert re.findall(r'<li data-path="encoder\.0\.query"><details( open)?>', text) == [" open", ""]

    # the result as JSON rides along
    data = json.loads(page.json)
    assert data["rewrites"] == [r.to_dict() for r in result.rewrites]
    assert [c["metrics"]["relative_error"] for c in data["report"]["layers"]] == [
        c.metrics["relative_error"] for c in result.report.layers
    ]


def test_report_is_self_contained(bert):
    _, text = bert
    page = Page(text)
    links = [v for _, a in page.tags for k, v in a.items() if k in ("href", "src", "xlink:href", "action", "data")]
    assert links and all(v.startswith("#") for v in links)  # in-page anchors only
    assert not [t for t, _ in page.tags if t in ("link", "img", "iframe", "object", "embed")]
    assert [a for t, a in page.tags if t == "script"] == [{"type": "application/json", "id": "msbnb-result"}]
    # the only URLs are the SVG namespace names, which a browser never fetches
    assert set(re.findall(r"https?://[^\"' )]+", text)) == {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    assert "@import" not in text and "url(http" not in text
    # every element id is unique in the page (each chart's SVG ids carry its own prefix) and every in-page
    # reference (nav links, the charts' clip paths) resolves
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids)) > 100
    refs = re.findall(r'(?:url\(#|href="#)([^")]+)', text)
    assert refs and set(refs) <= set(ids)


def _odd_network_result():
    """A root class named Net<T>&, a child named a<b>&c (excluded by name), a rule named nf4<script>&."""

    def init(self):
        nn.Cell.__init__(self)
        rng = np.random.default_rng(0)
        self.fc = _dense(rng, 64, 32)
        self.insert_child_to_cell("a<b>&c", _dense(rng, 64, 32))

    def construct(self, x):
        return self.fc(x) + self._cells["a<b>&c"](x)

    net = type("Net<T>&", (nn.Cell,), {"__init__": init, "construct": construct})()
    rule = Rule(
        "nf4<script>&",
        "linear-cell",
        {"to": "linear4bit", "quant_type": "nf4"},
        where={"exclude": ["a<b>&c"]},
        description="<i>d</i> & more",
    )
    x = ms.Tensor(np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))
    return mb.apply(net, RuleSet([rule]), sample_inputs=x)


def test_names_with_markup_are_escaped(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    result = _odd_network_result()
    assert [r.path for r in result.rewrites] == ["fc"] and result.kept[0][0] == "a<b>&c"
    text = result.to_html("odd.html").read_text(encoding="utf-8")
    for raw in ("a<b>&c", "Net<T>&", "nf4<script>&", "<i>d</i>"):
        assert raw not in text
    assert "<script" not in text.replace('<script type="application/json" id="msbnb-result">', "")
    page = Page(text)
    assert page.table("kept")["a<b>&c"][1][1] == "excluded by name: 'a<b>&c' matches 'a<b>&c' (nf4<script>&)"
    assert page.table("rules")["nf4<script>&"][1][6] == "<i>d</i> & more"
    assert '<li data-path="a&lt;b&gt;&amp;c">' in text  # the tree node of the kept child
    assert "<title>msbnb_pass report: Net&lt;T&gt;&amp;</title>" in text
    assert json.loads(page.json)["kept"] == [{"path": "a<b>&c", "reason": result.kept[0][1]}]


def test_dry_run_report_shows_the_plan(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    result = _bert_result(dry_run=True)
    text = result.to_html("plan.html", title="plan").read_text(encoding="utf-8")
    page = Page(text)
    assert "dry run: would rewrite 14 of 16 weight-holding layers" in text
    assert [a.get("id") for t, a in page.tags if t == "div" and a.get("class") == "chart"] == ["chart-memory"]
    rows = page.table("verification")
    assert {k: c[-1] for k, (_, c) in rows.items()} == {r.path: "planned" for r in result.rewrites}
    # a plan records the float weight it would rewrite (the 3 x 64 classifier: 768 bytes) and no size after
    assert rows["classifier"][1][3:5] == ["not verified", f"{3 * 64 * 4} B → –"]
    assert "<h3>after</h3>" not in text and "<h3>before (the plan)</h3>" in text
    assert page.table("memory")["whole network"][1][3:] == ["–", ""]


def test_write_is_atomic_and_checks_the_target(bert, tmp_path, monkeypatch):
    result, text = bert
    target = tmp_path / "report.html"
    target.write_text("old report")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("msbnb_pass.outputs.os.fsync", fail)
    with pytest.raises(OSError, match="No space left on device"):
        result.to_html(target)
    assert target.read_text() == "old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    monkeypatch.undo()
    with pytest.raises(OutputError, match=r"HTML report '.*' is a directory, not a regular file"):
        result.to_html(tmp_path)
    assert result.to_html(target) == target and target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_msbnb_report_and_apply_html(capsys):
    assert main(["report", *BERT_ARGS, "-o", "r.html", "--title", "BERT <zoo>"]) == 0
    out = capsys.readouterr()
    assert "rewrote 14 layer(s)" in out.out and out.err.strip().endswith("wrote r.html")
    page = Page(Path("r.html").read_text(encoding="utf-8"))
    rows = page.table("verification")
    assert len(rows) == 15 and rows["classifier"][0] == "viol"  # --on-violation warn: flagged, not fatal
    assert "<h1>BERT &lt;zoo&gt;</h1>" in Path("r.html").read_text(encoding="utf-8")

    assert main(["apply", *BERT_ARGS, "--on-violation", "keep_float", "--html", "a.html"]) == 0
    capsys.readouterr()
    rows = Page(Path("a.html").read_text(encoding="utf-8")).table("verification")
    cls, cells = rows["classifier"]
    assert cls == "keptf" and cells[10] == "kept_float"
    why = escape("verification failed (relative error 0.1375 > 0.13)")
    assert f'<td class=nw title="{why}">kept_float</td>' in Path("a.html").read_text(encoding="utf-8")

    os.mkdir("adir")
    assert main(["report", *BERT_ARGS, "-o", "adir"]) == 2
    assert "msbnb report: error: -o/--output 'adir' is a directory, not a regular file" in capsys.readouterr().err
    assert main(["apply", *BERT_ARGS, "--html", "adir"]) == 2
    assert "msbnb apply: error: --html 'adir' is a directory, not a regular file" in capsys.readouterr().err


# ---- a real browser --------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png_rows(data: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(width, height, [(filter type, row bytes)]) of an 8-bit RGB/RGBA PNG, checked chunk by chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0], kind
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    assert len(raw) == height * stride
    return width, height, [(raw[i * stride], raw[i * stride + 1 + channels : (i + 1) * stride]) for i in range(height)]


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); the browser check needs it"
)
def test_chromium_renders_the_report(bert, tmp_path):
    chromium = CHROMIUM
    result, text = bert
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    width, height, rows = _png_rows(shot.read_bytes())
    assert (width, height) == (1400, 2400)
    # a blank page filters to all-zero rows (every filter type predicts a uniform image exactly); the report
    # changes from row to row and along rows in most of the height
    busy = sum(1 for f, row in rows if (any(row) if f else len(set(row)) > 1))
    assert busy > height // 3, busy

    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = Page(dom.stdout)
    assert set(rendered.table("verification")) == {r.path for r in result.rewrites} | {"end to end"}
    assert sum(1 for t, _ in rendered.tags if t == "svg") == 2


def test_big_network_report_folds_deep_cells_and_plots_by_index(ms_cpu):
    """77 rewritten layers (an 11-layer LLaMA-like network, int4): the error chart becomes one bar per layer
    in network order without per-layer labels, and the trees open only their top three levels."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = zoo.LlamaLike(layers=11)
    ids = ms.Tensor(np.random.default_rng(0).integers(0, 96, (2, 8)).astype(np.int32))
    result = mb.apply(net, "int4", sample_inputs=ids)
    assert len(result.rewrites) == 77
    text = result.to_html("big.html").read_text(encoding="utf-8")
    start = text.index('id="chart-errors"')
    errors_svg = text[start : text.index("</svg>", start)]
    bars = re.findall(r'<path [^>]*clip-path="[^"]+" style="fill: (#[0-9a-f]{6})', errors_svg)
    assert bars == [FORMAT_COLOURS["int4"]] * 77
    assert "layers.0.mlp.up_proj</text>" not in errors_svg and "layer (in network order" in errors_svg
    assert len(Page(text).table("verification")) == 78

    def opened(path: str) -> list[bool]:  # before and after tree
        return [m == " open" for m in re.findall(rf'<li data-path="{re.escape(path)}"><details( open)?>', text)]

    assert opened("") == opened("layers") == opened("layers.3") == [True, True]
    assert opened("layers.3.self_attn") == opened("layers.3.mlp") == [False, False]
    assert opened("layers.3.mlp.up_proj") == [False, False]
