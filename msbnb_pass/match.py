"""Matching rules against a NetGraph, with a reason for everything that is not rewritten.

Each rule's pattern is matched as a subgraph (monomorphism, networkx's DiGraphMatcher) of the NetGraph,
restricted first to the nodes each pattern node could map to. Every match becomes a ``Candidate`` (the
layer it would rewrite, its weight, shape and layout), is checked against the rule's conditions and the
rewrite's structural requirements (a weight used elsewhere cannot move, a primitive shared by two
calls cannot be substituted per call, ...), and the highest-priority survivor per layer wins; two rules
of equal priority on one layer are an error. The ``MatchTrace`` records, for every weight-holding node,
which rule rewrote it or why each rule did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from networkx.algorithms import isomorphism

from .errors import MatchConflict
from .graph import NetGraph
from .rules import LinearSpec, Rule, RuleSet

__all__ = ["Candidate", "Decision", "Match", "MatchConflict", "MatchTrace", "find_matches"]


@dataclass
class Candidate:
    """A layer a rule could rewrite: a Linear-like cell, or a matmul call reading a weight parameter."""

    level: str  # "cell" | "call"
    anchor: str  # NetGraph node id of the cell or the call
    path: str  # dotted path of the cell, or "<owner>.<primitive attribute>" of the call
    weight: str  # param node id
    bias: str | None
    layout: str  # "out_in" | "in_out"
    in_features: int | None
    out_features: int | None
    weight_dtype: str
    bindings: dict[str, str] = field(default_factory=dict)
    owner: str | None = None  # call level: the cell whose primitive attribute is substituted
    prim_attr: str | None = None
    bias_attr: str | None = None  # call level with a fused bias add: that primitive's attribute
    weight_attr: str | None = None
    bias_param_attr: str | None = None
    shared: bool = False  # the weight has other uses (a rule allowed it): quantize a copy, keep the float one
    spec: LinearSpec | None = None  # cell level: how the Linear-like cell keeps its weight, bias, activation
    kind: str = "linear"  # or "embedding": a lookup table [num_embeddings (in_features), embedding_dim (out_features)]


@dataclass
class Match:
    rule: Rule
    candidate: Candidate


@dataclass
class Decision:
    """What happened to one weight-holding node."""

    path: str
    level: str
    weights: list[str]
    rule: str | None = None  # the rule that rewrites it
    reasons: dict[str, str] = field(default_factory=dict)  # rule -> why it did not
    note: str = ""

    @property
    def status(self) -> str:
        return "rewrite" if self.rule else "kept"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "level": self.level,
            "weights": self.weights,
            "status": self.status,
            "rule": self.rule,
            "reasons": dict(self.reasons),
            "note": self.note,
        }


@dataclass
class MatchTrace:
    decisions: list[Decision]
    unused_rules: list[str]

    def explain(self, path: str | None = None) -> str:
        """Text: per weight-holding node, the rule that rewrites it or each rule's reason."""
        lines = []
        for d in self.decisions:
            if path is not None and d.path != path:
                continue
            shown = d.path or "<root>"
            if d.rule:
                lines.append(f"{shown} [{d.level}]: rewritten by rule {d.rule!r}")
            else:
                lines.append(f"{shown} [{d.level}]: kept in full precision" + (f" ({d.note})" if d.note else ""))
            for rule, reason in d.reasons.items():
                lines.append(f"    {rule}: {reason}")
        for name in self.unused_rules:
            lines.append(f"warning: rule {name!r} matched nothing")
        return "\n".join(lines)

    def decision(self, path: str) -> Decision:
        for d in self.decisions:
            if d.path == path:
                return d
        raise KeyError(f"no weight-holding node at {path!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": [d.to_dict() for d in self.decisions], "unused_rules": list(self.unused_rules)}


# ---- matching --------------------------------------------------------------------------------------------------
def _edge_ok(host_edges: dict, wanted: tuple) -> bool:
    for attrs in host_edges.values():
        if all(attrs.get(k, "data" if k == "kind" else None) == v for k, v in wanted):
            return True
    return False


def _pattern_bindings(netgraph: NetGraph, rule: Rule, ruleset: RuleSet) -> list[dict[str, str]]:
    """Every injective map pattern node -> host node that keeps the pattern's nodes and edges."""
    pattern = rule.pattern
    g = netgraph.graph
    allowed: dict[str, set[str]] = {}
    for host in g.nodes:
        data = g.nodes[host]
        names = {
            n
            for n, spec in pattern.nodes.items()
            if spec.reason(data, netgraph.obj(host), ruleset.linear_spec, ruleset.embedding_weight) is None
        }
        if names:
            allowed[host] = names
    if not allowed:
        return []
    if len(pattern.nodes) == 1:
        (only,) = pattern.nodes
        return [{only: h} for h, names in allowed.items() if only in names]
    host = nx.DiGraph()
    for h, names in allowed.items():
        host.add_node(h, allowed=names)
    for u, v, data in g.subgraph(allowed).edges(data=True):
        if host.has_edge(u, v):
            host[u][v]["multi"][len(host[u][v]["multi"])] = data
        else:
            host.add_edge(u, v, multi={0: data})
    pat = nx.DiGraph()
    for n in pattern.nodes:
        pat.add_node(n, name=n)
    for src, dst, attrs in pattern.edges:
        pat.add_edge(src, dst, attrs=tuple(attrs) + (() if any(k == "kind" for k, _ in attrs) else (("kind", "data"),)))
    matcher = isomorphism.DiGraphMatcher(
        host,
        pat,
        node_match=lambda h, p: p["name"] in h["allowed"],
        edge_match=lambda h, p: _edge_ok(h["multi"], p["attrs"]),
    )
    out = []
    seen = set()
    for mapping in matcher.subgraph_monomorphisms_iter():
        binding = {p: h for h, p in mapping.items()}
        key = tuple(sorted(binding.items()))
        if key not in seen:
            seen.add(key)
            out.append(binding)
    return out


def _embedding_candidate(
    netgraph: NetGraph, rule: Rule, cell_id: str, attr: str, bindings: dict[str, str]
) -> tuple[Candidate | None, str]:
    if rule.replacement.kind != "embedding":
        return None, f"an embedding (lookup table); replacement {rule.replacement.name!r} replaces a Linear"
    params = dict(netgraph.params_of(cell_id))
    if attr not in params:
        return None, f"has no table parameter {attr!r}"
    wid = params[attr]
    w = netgraph.node(wid)
    if w["ndim"] != 2:
        return None, f"table {w['path']} is {w['ndim']}-D, an embedding needs a 2-D [num, dim] table"
    num, dim = w["shape"]
    cand = Candidate(
        "cell", cell_id, netgraph.node(cell_id)["path"], wid, None, "out_in", int(num), int(dim), w["dtype"], bindings
    )
    cand.kind = "embedding"
    return cand, ""


def _cell_candidate(
    netgraph: NetGraph, ruleset: RuleSet, rule: Rule, cell_id: str, bindings: dict[str, str]
) -> tuple[Candidate | None, str]:
    cell = netgraph.obj(cell_id)
    table = ruleset.embedding_weight(type(cell))
    if table is not None:
        return _embedding_candidate(netgraph, rule, cell_id, table, bindings)
    spec = ruleset.linear_spec(type(cell))
    if spec is not None and rule.replacement.kind != "linear":
        return None, f"a Linear-like cell; replacement {rule.replacement.name!r} replaces an embedding"
    if spec is None:
        return None, f'{type(cell).__name__} is not a registered Linear-like class (register_linear or [linear."..."])'
    params = dict(netgraph.params_of(cell_id))
    if spec.weight not in params:
        return None, f"has no weight parameter {spec.weight!r}"
    wid = params[spec.weight]
    w = netgraph.node(wid)
    if w["ndim"] != 2:
        return None, f"weight {w['path']} is {w['ndim']}-D, a Linear needs a 2-D weight"
    out_f, in_f = w["shape"] if spec.layout == "out_in" else w["shape"][::-1]
    bias = params.get(spec.bias) if spec.bias else None
    return Candidate(
        "cell",
        cell_id,
        netgraph.node(cell_id)["path"],
        wid,
        bias,
        spec.layout,
        int(in_f),
        int(out_f),
        w["dtype"],
        bindings,
        spec=spec,
    ), ""


def _call_candidate(netgraph: NetGraph, rule: Rule, bindings: dict[str, str]) -> tuple[Candidate | None, str]:
    pattern = rule.pattern
    call_id = bindings[pattern.anchor]
    call = netgraph.node(call_id)
    weights = [
        (n, h) for n, h in bindings.items() if pattern.nodes[n].kind == "param" and netgraph.node(h)["ndim"] == 2
    ]
    if not weights:
        return None, "the pattern binds no 2-D weight parameter"
    wid = weights[0][1]
    edge = next(
        (d for _, v, d in netgraph.graph.out_edges(wid, data=True) if v == call_id and d.get("kind") == "data"), None
    )
    if call.get("callee") != "primitive":
        return None, "a functional call that cannot be rewritten in place (no primitive attribute to substitute)"
    attrs = call.get("prim_attrs", {})
    if attrs.get("transpose_a"):
        return None, "transpose_a=True: the activation operand is transposed, which the quantized matmul does not do"
    if edge is None or edge.get("arg") != 1:
        return None, "the weight is not the second operand of the matmul"
    layout = "out_in" if attrs.get("transpose_b") else "in_out"
    if edge.get("transposed"):
        layout = "in_out" if layout == "out_in" else "out_in"
    w = netgraph.node(wid)
    out_f, in_f = w["shape"] if layout == "out_in" else w["shape"][::-1]
    bias = add_call = None
    for n, h in bindings.items():
        if pattern.nodes[n].kind == "param" and netgraph.node(h)["ndim"] == 1:
            bias = h
        if pattern.nodes[n].kind == "call" and h != call_id:
            add_call = h
    bias_attr = netgraph.node(add_call).get("attr") if add_call else None
    bias_param_attr = None
    if bias is not None and add_call is not None:
        bias_edge = next(
            d for _, v, d in netgraph.graph.out_edges(bias, data=True) if v == add_call and d.get("kind") == "data"
        )
        bias_param_attr = bias_edge.get("attr")
        if bias_param_attr is None or "." in bias_param_attr:
            return None, f"the bias {bias_param_attr} is not a direct attribute of the cell that adds it"
    owner = call["owner"]
    cand = Candidate(
        "call",
        call_id,
        call["path"],
        wid,
        bias,
        layout,
        int(in_f),
        int(out_f),
        w["dtype"],
        bindings,
        owner=owner,
        prim_attr=call["attr"],
        bias_attr=bias_attr,
        weight_attr=edge.get("attr"),
        bias_param_attr=bias_param_attr,
    )
    return cand, ""


def _structural_reason(netgraph: NetGraph, ruleset: RuleSet, cand: Candidate, allow_shared: bool) -> str | None:
    """Why the rewrite cannot be done in place, independent of the rule's conditions (sets cand.shared)."""
    w = netgraph.node(cand.weight)
    owners = [o for o, _ in w["owners"]]
    if cand.level == "cell":
        outside = [u for u in netgraph.uses(cand.weight) if netgraph.node(u)["owner"] != cand.anchor]
        if cand.kind == "embedding":
            for u in outside:
                edge = next(
                    (d for _, v, d in netgraph.graph.out_edges(cand.weight, data=True) if v == u and d.get("attr")),
                    None,
                )
                if edge is not None and "." in edge["attr"]:
                    return (
                        f"the table is also read as '{edge['attr']}' by {netgraph.node(u)['path'] or '<root>'} "
                        "(a tied output head): replacing the embedding cell would hand that use the packed codes, "
                        "so it is kept even with allow_shared; untie the head to quantize both"
                    )
        cand.shared = len(set(owners)) > 1 or bool(outside)
        if cand.shared and not allow_shared:
            others = sorted({*(o for o in owners if o != cand.anchor), *(netgraph.node(u)["path"] for u in outside)})
            return f"weight shared with another use ({', '.join(o or '<root>' for o in others)}); tied weights are kept unless a rule sets allow_shared"
        if netgraph.node(cand.anchor)["source"] != "read":
            return None  # a registered Linear-like cell is swapped whole; its source is not needed
        return None
    owner = netgraph.node(cand.owner)
    reads = owner.get("attr_reads", {})
    sites = owner.get("call_sites", {})
    uses = netgraph.uses(cand.weight)
    cand.shared = len(uses) > 1 or reads.get(cand.weight_attr, 0) > 1 or len(set(owners)) > 1
    if cand.shared and not allow_shared:
        return "weight used elsewhere (read more than once); tied weights are kept unless a rule sets allow_shared"
    if not cand.shared and cand.weight_attr and "." in cand.weight_attr:
        return (
            f"the weight {cand.weight_attr} belongs to another cell; it can only be quantized as a copy (allow_shared)"
        )
    if sites.get(cand.prim_attr, 0) > 1:
        return (
            f"primitive attribute '{cand.prim_attr}' of {cand.owner or '<root>'} is shared by "
            f"{sites[cand.prim_attr]} calls; substituting it would change all of them"
        )
    if cand.bias_attr and sites.get(cand.bias_attr, 0) > 1:
        return f"bias primitive '{cand.bias_attr}' is shared by {sites[cand.bias_attr]} calls"
    if cand.bias is not None:
        bias_uses = netgraph.uses(cand.bias)
        if len(bias_uses) > 1 or reads.get(cand.bias_param_attr, 0) > 1:
            return "bias parameter used elsewhere"
    cls = type(netgraph.obj(cand.owner))
    if ruleset.linear_spec(cls) is not None:
        return f"inside a Linear-like cell ({cls.__name__}): cell-level rules rewrite it as a whole"
    return None


def _check_conditions(ruleset: RuleSet, rule: Rule, cand: Candidate) -> str | None:
    for key, value in rule.where.items():
        reason = ruleset.check(key).fn(cand, value)
        if reason:
            return reason
    return None


def find_matches(netgraph: NetGraph, ruleset: RuleSet) -> tuple[list[Match], MatchTrace]:
    """Match every rule; return the winning matches (one per layer) and the trace explaining all nodes."""
    g = netgraph.graph
    ruleset.refresh()
    # the weight-holding sites the trace reports on: Linear-like cells, other cells whose weights no call
    # reads (nothing else could rewrite them), and calls reading a weight outside Linear-like cells
    # (with rules for lookup tables, embedding cells too: then the gathers inside them are not sites)
    sites: dict[str, Decision] = {}
    embeddings = ruleset.has_embedding_rules()

    def whole(cls: type) -> bool:
        return ruleset.linear_spec(cls) is not None or (embeddings and ruleset.embedding_weight(cls) is not None)

    for call in netgraph.nodes("call"):
        weights = [
            u
            for u, _, d in g.in_edges(call, data=True)
            if d.get("kind") == "data" and g.nodes[u]["kind"] == "param" and g.nodes[u]["ndim"] >= 2
        ]
        if weights and not whole(type(netgraph.obj(g.nodes[call]["owner"]))):
            sites[call] = Decision(g.nodes[call]["path"], "call", [g.nodes[p]["path"] for p in weights])
    for cid in netgraph.nodes("cell"):
        weights = [pid for _, pid in netgraph.params_of(cid) if netgraph.node(pid)["ndim"] >= 2]
        linear = whole(type(netgraph.obj(cid)))
        if weights and (linear or not any(netgraph.uses(p) for p in weights)):
            sites[cid] = Decision(g.nodes[cid]["path"], "cell", [g.nodes[p]["path"] for p in weights])

    viable: dict[str, list[Match]] = {}
    matched_rules = set()
    for rule in ruleset:
        pattern = rule.pattern
        bound_anchors = {}
        for bindings in _pattern_bindings(netgraph, rule, ruleset):
            anchor = bindings[pattern.anchor]
            if pattern.level == "cell":
                cand, why = _cell_candidate(netgraph, ruleset, rule, anchor, bindings)
            else:
                cand, why = _call_candidate(netgraph, rule, bindings)
            if cand is None:
                bound_anchors.setdefault(anchor, why)
                continue
            why = _structural_reason(netgraph, ruleset, cand, bool(rule.where.get("allow_shared", False)))
            why = why or _check_conditions(ruleset, rule, cand)
            if why:
                bound_anchors.setdefault(anchor, why)
                continue
            bound_anchors[anchor] = ""
            viable.setdefault(anchor, []).append(Match(rule, cand))
            matched_rules.add(rule.name)
        # reasons for the sites this rule did not take
        anchor_spec = pattern.nodes[pattern.anchor]
        for site_id, decision in sites.items():
            if bound_anchors.get(site_id) == "" or decision.level != pattern.level:
                continue
            if site_id in bound_anchors:
                decision.reasons[rule.name] = bound_anchors[site_id]
                continue
            reason = anchor_spec.reason(
                g.nodes[site_id], netgraph.obj(site_id), ruleset.linear_spec, ruleset.embedding_weight
            )
            if reason is None:
                reason = f"the surrounding graph does not fit pattern {pattern.name!r} (needs {_describe(pattern)})"
            decision.reasons[rule.name] = reason

    # one winner per layer; cells rewritten whole cover the calls inside them
    winners: list[Match] = []
    for anchor, matches in viable.items():
        matches.sort(key=lambda m: -m.rule.priority)
        top = [m for m in matches if m.rule.priority == matches[0].rule.priority]
        if len(top) > 1 and len({m.rule.name for m in top}) > 1:
            names = " and ".join(repr(m.rule.name) for m in top)
            raise MatchConflict(
                f"conflicting rules of equal priority {top[0].rule.priority} on {g.nodes[anchor]['path'] or '<root>'}: "
                f"{names}; give one a higher priority or narrow its 'where'"
            )
        win = matches[0]
        winners.append(win)
        if anchor in sites:
            sites[anchor].rule = win.rule.name
            for loser in matches[1:]:
                sites[anchor].reasons[loser.rule.name] = f"lower priority than {win.rule.name!r}"
    # one rewrite per weight: the first winner by priority claims it
    winners.sort(key=lambda m: (-m.rule.priority, m.candidate.path))
    claimed: dict[str, str] = {}
    final = []
    for m in winners:
        owner = claimed.get(m.candidate.weight)
        if owner:
            site = sites.get(m.candidate.anchor)
            if site:
                site.rule = None
                site.reasons[m.rule.name] = f"its weight is already rewritten by the match on {owner}"
            continue
        claimed[m.candidate.weight] = m.candidate.path
        final.append(m)
    for site_id, d in sites.items():
        source = g.nodes[site_id].get("source")
        if d.level == "cell" and source and source != "read":
            d.note = f"source {source}"
        elif not d.rule and not d.reasons:
            d.note = "no rule applies"
    unused = [r.name for r in ruleset if r.name not in matched_rules]
    decisions = sorted(sites.values(), key=lambda d: d.path)
    return final, MatchTrace(decisions, unused)


def _describe(pattern) -> str:
    parts = []
    for src, dst, attrs in pattern.edges:
        a = ",".join(f"{k}={v}" for k, v in attrs)
        parts.append(f"{src}->{dst}" + (f"[{a}]" if a else ""))
    return ", ".join(parts) or "its node"
