"""NetGraph: a networkx graph of a MindSpore network — its cells, parameters and the calls inside construct.

Nodes (each keeps its dotted path, so rules, dumps and checkpoints speak the same names):

* ``cell`` — a Cell (id: its dotted path, ``""`` for the root): class, parameters, whether its source could
  be read, every path it is reachable at (a cell reused at two places is one node with two parents).
* ``param`` — a Parameter (id ``param:<path>``): shape, dtype, bytes, every (cell, attribute) owning it
  (tied parameters are one node with several owners) and every call that reads it.
* ``call`` — a call inside a cell's ``construct`` (or a method it calls), found by reading the source
  with ``ast``: ``self.<primitive>(...)`` with the primitive's attributes (e.g. ``transpose_b``),
  ``self.<child>(...)``, and functional calls (``ops.matmul(x, self.w)``) that read a parameter.

Edges: ``contains`` (cell -> child cell, cell -> its parameters; ``attr`` names the attribute) and
``data`` (parameter -> call with the operand index ``arg``; call -> call through local variables).
Where the source cannot be read or parsed, the cell node says so (``source`` = "unavailable: ...")
instead of guessing.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import networkx as nx
import numpy as np

logger = logging.getLogger(__name__)

ROOT = ""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _dtype_name(dtype: Any) -> str:
    name = str(dtype)
    return {
        "Float32": "float32",
        "Float16": "float16",
        "BFloat16": "bfloat16",
        "Int8": "int8",
        "UInt8": "uint8",
        "Int32": "int32",
        "Int64": "int64",
        "Float64": "float64",
        "Bool": "bool",
    }.get(name, name.lower())


def param_id(path: str) -> str:
    return f"param:{path}"


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- source analysis ------------------------------------------------------------------------------------------
@dataclass
class CallSite:
    """One call found in a method's source."""

    func: str  # "self.matmul", "self.fc", "ops.matmul", ...
    self_attr: str | None  # first attribute after self for self.<attr>(...) calls
    args: list[dict]  # one per positional argument: {"kind": "self_attr"|"var"|"expr", "value": ...}
    lineno: int
    method: str
    in_branch: bool
    in_loop: bool
    target: str | None  # the variable the result is assigned to, if a simple assignment


@dataclass
class MethodInfo:
    calls: list[CallSite] = field(default_factory=list)
    self_methods: set[str] = field(default_factory=set)  # self.<method>(...) of the same class
    attr_reads: dict[str, int] = field(default_factory=dict)  # self.<attr> chains read -> count


def _attr_chain(node: ast.AST) -> list[str] | None:
    """["self", "a", "b"] for self.a.b (possibly with a trailing .T); None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


class _MethodVisitor(ast.NodeVisitor):
    """Collects the calls of one method, innermost first, with their operands."""

    def __init__(self, method: str):
        self.info = MethodInfo()
        self.method = method
        self.branch = 0
        self.loop = 0
        self._pending_target: str | None = None

    def _arg(self, node: ast.AST) -> dict:
        if isinstance(node, ast.Call):
            index = self._visit_call(node, None)
            if index is not None:
                return {"kind": "call", "value": index}
            return {"kind": "expr", "value": ast.unparse(node)[:60]}
        self.visit(node)  # count attribute reads, find nested calls
        chain = _attr_chain(node)
        if chain and chain[0] == "self" and len(chain) > 1:
            if chain[-1] == "T":  # a transposed parameter
                return {"kind": "self_attr", "value": ".".join(chain[1:-1]), "transposed": True}
            return {"kind": "self_attr", "value": ".".join(chain[1:])}
        if isinstance(node, ast.Name):
            return {"kind": "var", "value": node.id}
        return {"kind": "expr", "value": ast.unparse(node)[:60]}

    def visit_If(self, node: ast.If):
        self.visit(node.test)
        self.branch += 1
        for child in node.body + node.orelse:
            self.visit(child)
        self.branch -= 1

    def visit_IfExp(self, node: ast.IfExp):
        self.branch += 1
        self.generic_visit(node)
        self.branch -= 1

    def _loop(self, node):
        self.loop += 1
        self.generic_visit(node)
        self.loop -= 1

    visit_For = visit_While = _loop

    def visit_Assign(self, node: ast.Assign):
        target = node.targets[0].id if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) else None
        if isinstance(node.value, ast.Call):
            for t in node.targets:
                self.visit(t)
            self._visit_call(node.value, target)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute):
        chain = _attr_chain(node)
        if chain and chain[0] == "self" and len(chain) > 1:
            key = ".".join(chain[1:-1] if chain[-1] == "T" else chain[1:])
            self.info.attr_reads[key] = self.info.attr_reads.get(key, 0) + 1
            return
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call):
        self._visit_call(node, None)

    def _visit_call(self, node: ast.Call, target: str | None) -> int | None:
        chain = _attr_chain(node.func)
        if not chain:
            self.generic_visit(node)
            return None
        args = [self._arg(a) for a in node.args]
        for kw in node.keywords:
            self.visit(kw.value)
        self_attr = chain[1] if chain[0] == "self" and len(chain) == 2 else None
        if self_attr is not None:
            self.info.self_methods.add(self_attr)
        elif chain[0] == "self" and len(chain) > 2:  # self.w.mean(): a method of an attribute reads it
            key = ".".join(chain[1:-1])
            self.info.attr_reads[key] = self.info.attr_reads.get(key, 0) + 1
        self.info.calls.append(
            CallSite(
                func=".".join(chain),
                self_attr=self_attr,
                args=args,
                lineno=node.lineno,
                method=self.method,
                in_branch=self.branch > 0,
                in_loop=self.loop > 0,
                target=target,
            )
        )
        return len(self.info.calls) - 1


@cache
def _method_source(cls: type, name: str) -> tuple[str | None, str]:
    """(source of cls.<name> dedented, or None; a reason when unavailable)."""
    fn = None
    for klass in cls.__mro__:
        if name in vars(klass):
            fn = vars(klass)[name]
            break
    if fn is None:
        return None, f"no method {name!r}"
    fn = getattr(fn, "__wrapped__", fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError) as exc:
        return None, f"unavailable: {type(exc).__name__}: {exc}"
    return textwrap.dedent(src), ""


@cache
def analyse_class(cls: type) -> tuple[dict[str, MethodInfo], str]:
    """Calls in ``construct`` and every method it (transitively) calls; plus a source status string."""
    methods: dict[str, MethodInfo] = {}
    todo = ["construct"]
    status = "read"
    while todo:
        name = todo.pop()
        if name in methods:
            continue
        src, reason = _method_source(cls, name)
        if src is None:
            if name == "construct":
                return {}, reason
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError as exc:
            if name == "construct":
                return {}, f"unavailable: cannot parse the source ({exc.msg})"
            continue
        func = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if func is None:
            return {}, "unavailable: construct is not a plain function (lambda or assignment)"
        visitor = _MethodVisitor(name)
        for stmt in func.body:
            visitor.visit(stmt)
        methods[name] = visitor.info
        for callee in visitor.info.self_methods:
            attr = inspect.getattr_static(cls, callee, None)
            if inspect.isfunction(attr) and callee not in methods:
                todo.append(callee)
    return methods, status


# ---- the graph -------------------------------------------------------------------------------------------------
class NetGraph:
    """The graph of one network, plus lookups from node ids back to the live objects (not serialised)."""

    def __init__(self, graph: nx.MultiDiGraph, objects: dict[str, Any] | None = None):
        self.graph = graph
        self._objects = objects or {}

    # node access --------------------------------------------------------------------------------------------------
    def nodes(self, kind: str | None = None) -> list[str]:
        return [n for n, d in self.graph.nodes(data=True) if kind is None or d.get("kind") == kind]

    def node(self, node_id: str) -> dict:
        return self.graph.nodes[node_id]

    def obj(self, node_id: str) -> Any:
        """The live Cell / Parameter / primitive a node stands for (while the graph is fresh)."""
        return self._objects.get(node_id)

    def children(self, cell_id: str) -> list[tuple[str, str]]:
        """(attribute, child cell id) of a cell, in definition order."""
        return [
            (d["attr"], v)
            for _, v, d in self.graph.out_edges(cell_id, data=True)
            if d.get("kind") == "contains" and self.graph.nodes[v]["kind"] == "cell"
        ]

    def params_of(self, cell_id: str) -> list[tuple[str, str]]:
        """(attribute, param id) directly owned by a cell."""
        return [
            (d["attr"], v)
            for _, v, d in self.graph.out_edges(cell_id, data=True)
            if d.get("kind") == "contains" and self.graph.nodes[v]["kind"] == "param"
        ]

    def calls_of(self, cell_id: str) -> list[str]:
        return [n for n, d in self.graph.nodes(data=True) if d.get("kind") == "call" and d.get("owner") == cell_id]

    def uses(self, param_node: str) -> list[str]:
        """Call nodes that read a parameter."""
        return [v for _, v, d in self.graph.out_edges(param_node, data=True) if d.get("kind") == "data"]

    # serialisation ---------------------------------------------------------------------------------------------------
    def to_json_data(self) -> dict:
        return nx.node_link_data(self.graph, edges="edges")

    @classmethod
    def from_json_data(cls, data: dict) -> NetGraph:
        return cls(nx.node_link_graph(data, directed=True, multigraph=True, edges="edges"))

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for _, d in self.graph.nodes(data=True):
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        return kinds


def _primitive_info(obj: Any) -> tuple[str, dict] | None:
    from mindspore.ops.primitive import Primitive

    if isinstance(obj, Primitive):
        attrs = {}
        for k, v in dict(getattr(obj, "attrs", {}) or {}).items():
            if isinstance(v, (bool, int, float, str)):
                attrs[k] = v
        return type(obj).__name__, attrs
    return None


def _resolve(cell: Any, dotted: str) -> Any:
    obj = cell
    for part in dotted.split("."):
        if part.isdigit() and hasattr(obj, "__getitem__"):
            try:
                obj = obj[int(part)]
                continue
            except (IndexError, TypeError, KeyError):
                return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def build_graph(net: Any) -> NetGraph:
    """Build the NetGraph of ``net`` (an ``nn.Cell``); read-only, never changes the network."""
    from mindspore import Parameter, nn

    if not isinstance(net, nn.Cell):
        raise TypeError(f"build_graph expects a mindspore.nn.Cell, got {type(net).__module__}.{type(net).__name__}")
    g = nx.MultiDiGraph()
    objects: dict[str, Any] = {}
    cell_ids: dict[int, str] = {}
    param_ids: dict[int, str] = {}

    def add_param(owner_id: str, attr: str, param: Parameter) -> str:
        key = id(param)
        if key in param_ids:
            pid = param_ids[key]
            g.nodes[pid]["owners"].append([owner_id, attr])
        else:
            path = join(owner_id, attr)
            pid = param_id(path)
            param_ids[key] = pid
            shape = tuple(int(d) for d in param.shape)
            g.add_node(
                pid,
                kind="param",
                path=path,
                name=param.name,
                shape=list(shape),
                ndim=len(shape),
                dtype=_dtype_name(param.dtype),
                nbytes=int(np.prod(shape, dtype=np.int64)) * int(param.itemsize),
                requires_grad=bool(param.requires_grad),
                owners=[[owner_id, attr]],
            )
            objects[pid] = param
        g.add_edge(owner_id, pid, kind="contains", attr=attr)
        return pid

    def visit(cell: nn.Cell, path: str, parent: str | None, attr: str | None) -> None:
        key = id(cell)
        if key in cell_ids:  # reused cell: one node, another parent
            cid = cell_ids[key]
            g.nodes[cid]["paths"].append(path)
            g.add_edge(parent, cid, kind="contains", attr=attr)
            return
        cid = path
        cell_ids[key] = cid
        cls = type(cell)
        g.add_node(
            cid,
            kind="cell",
            path=path,
            type=qualified_name(cls),
            type_name=cls.__name__,
            paths=[path],
            source="pending",
        )
        objects[cid] = cell
        if parent is not None:
            g.add_edge(parent, cid, kind="contains", attr=attr)
        for pattr, param in list(getattr(cell, "_params", {}).items()):
            if param is not None:
                add_param(cid, pattr, param)
        for cattr, child in list(getattr(cell, "_cells", {}).items()):
            if child is not None:
                visit(child, join(path, cattr), cid, cattr)

    visit(net, ROOT, None, None)

    # calls inside construct, per cell node
    for cid in [n for n, d in g.nodes(data=True) if d["kind"] == "cell"]:
        cell = objects[cid]
        methods, status = analyse_class(type(cell))
        g.nodes[cid]["source"] = status
        if status != "read":
            continue
        reads: dict[str, int] = {}  # self.<attr> reads in the source (a weight read twice cannot move)
        call_sites: dict[str, int] = {}  # self.<attr>(...) call sites (a primitive shared by two calls)
        call_nodes: list[str] = []  # this cell's call nodes
        for mname, info in methods.items():
            for k, v in info.attr_reads.items():
                reads[k] = reads.get(k, 0) + v
            producers: dict[str, str] = {}
            site_nodes: dict[int, str] = {}
            for index, site in enumerate(info.calls):
                if site.self_attr:
                    call_sites[site.self_attr] = call_sites.get(site.self_attr, 0) + 1
                callee = _resolve(cell, site.self_attr) if site.self_attr else None
                prim = _primitive_info(callee) if callee is not None else None
                functional = site.self_attr is None and not site.func.startswith("self.")
                if site.self_attr and isinstance(callee, nn.Cell):
                    callee_kind, op, attrs = "cell", type(callee).__name__, {}
                elif prim is not None:
                    callee_kind, (op, attrs) = "primitive", prim
                elif site.self_attr and inspect.ismethod(callee):
                    callee_kind, op, attrs = "method", site.self_attr, {}
                elif functional:
                    callee_kind, op, attrs = "function", site.func.split(".")[-1], {}
                else:
                    continue
                param_args = []
                for i, arg in enumerate(site.args):
                    if arg["kind"] == "self_attr":
                        obj = _resolve(cell, arg["value"])
                        if isinstance(obj, Parameter) and id(obj) in param_ids:
                            param_args.append((i, param_ids[id(obj)], arg.get("transposed", False), arg["value"]))
                if callee_kind == "function" and not param_args:
                    continue  # only functional calls that read a parameter matter for rewriting
                nid = f"{cid}::{mname}:{site.lineno}:{site.func}#{index}"
                site_nodes[index] = nid
                call_nodes.append(nid)
                g.add_node(
                    nid,
                    kind="call",
                    path=join(cid, site.self_attr or site.func),
                    owner=cid,
                    method=mname,
                    attr=site.self_attr,
                    func=site.func,
                    callee=callee_kind,
                    op=op,
                    prim_attrs=attrs,
                    lineno=site.lineno,
                    in_branch=site.in_branch,
                    in_loop=site.in_loop,
                    nargs=len(site.args),
                    functional=functional,
                )
                for i, pid, transposed, attr_path in param_args:
                    g.add_edge(pid, nid, kind="data", arg=i, transposed=transposed, attr=attr_path)
                for i, arg in enumerate(site.args):
                    if arg["kind"] == "var" and arg["value"] in producers:
                        g.add_edge(producers[arg["value"]], nid, kind="data", arg=i)
                    elif arg["kind"] == "call" and arg["value"] in site_nodes:
                        g.add_edge(site_nodes[arg["value"]], nid, kind="data", arg=i)
                if site.target:
                    producers[site.target] = nid
        g.nodes[cid]["attr_reads"] = reads
        g.nodes[cid]["call_sites"] = call_sites
        # a primitive attribute called at several places: number the call nodes so each path is unique
        seen: dict[str, int] = {}
        for nid in sorted(call_nodes, key=lambda n: g.nodes[n]["lineno"]):
            attr = g.nodes[nid]["attr"]
            if attr and call_sites.get(attr, 0) > 1:
                g.nodes[nid]["path"] = f"{join(cid, attr)}[{seen.get(attr, 0)}]"
                seen[attr] = seen.get(attr, 0) + 1
    return NetGraph(g, objects)
