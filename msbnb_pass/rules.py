"""Declarative rewrite rules: patterns as small graphs, conditions, replacements by name, priorities.

A rule names a pattern (a small graph matched as a subgraph of the NetGraph), conditions (``where``) and
a replacement (``rewrite = { to = "<name>", ... }``). Rules are data: TOML files (the built-in families
live in the top-level ``rules/`` directory) or ``Rule(...)`` in Python. Everything computed is a named
check, replacement or Linear-like class registered in Python::

    [pattern.linear-cell]
    anchor = "lin"
    nodes.lin = { kind = "cell", type = ["@linear"] }   # @linear: any registered Linear-like class

    [linear."mypkg.layers.MyLinear"]                    # my Linear keeps W in self.w as [in, out]
    weight = "w"
    bias = "b"
    layout = "in_out"

    [[rule]]
    name = "dense-nf4"
    pattern = "linear-cell"
    priority = 100
    where = { exclude = ["lm_head", "*.classifier"], min_in_features = 64 }
    rewrite = { to = "linear4bit", quant_type = "nf4", blocksize = 64, double_quant = true }

A malformed file fails with its path, the rule (or pattern) name and the offending key.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


# ---- errors -------------------------------------------------------------------------------------------------
class RuleError(ValueError):
    """A rule file or rule is malformed (the message names the file, the rule and the key)."""


# ---- Linear-like classes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearSpec:
    """How to read a Linear-like cell: where its weight and bias live and the weight's layout.

    ``layout`` is "out_in" (``[out, in]``, as nn.Dense) or "in_out" (``[in, out]``: y = x @ w). The cell is
    assumed to compute ``y = activation(x @ W^T + b)`` on the last dimension of its single input.
    """

    weight: str = "weight"
    bias: str | None = "bias"
    layout: str = "out_in"
    activation: str | None = None  # attribute holding an activation Cell, applied when its flag is set
    activation_flag: str | None = None

    def __post_init__(self):
        if self.layout not in ("out_in", "in_out"):
            raise RuleError(f"LinearSpec.layout must be 'out_in' or 'in_out', got {self.layout!r}")


_LINEAR: dict[str, LinearSpec] = {}


def register_linear(
    cls: type | str,
    weight: str = "weight",
    bias: str | None = "bias",
    layout: str = "out_in",
    activation: str | None = None,
    activation_flag: str | None = None,
) -> LinearSpec:
    """Declare a Linear-like cell class (by class or qualified name) so that ``@linear`` patterns match it."""
    spec = LinearSpec(weight, bias, layout, activation, activation_flag)
    _LINEAR[_class_key(cls)] = spec
    return spec


def _class_key(cls: type | str) -> str:
    if isinstance(cls, str):
        resolved = resolve_class(cls)
        return f"{resolved.__module__}.{resolved.__qualname__}" if resolved else cls
    return f"{cls.__module__}.{cls.__qualname__}"


def linear_spec(cls: type) -> LinearSpec | None:
    """The LinearSpec of a class (exact class first, then the built-in ones), or None."""
    _builtin_linears()
    return _LINEAR.get(f"{cls.__module__}.{cls.__qualname__}")


_BUILTIN_LINEARS_ADDED: list[bool] = []


def _builtin_linears() -> None:
    """nn.Dense and mint.nn.Linear, registered on first use (importing MindSpore is not free)."""
    if _BUILTIN_LINEARS_ADDED:
        return
    from mindspore import mint, nn

    _LINEAR.setdefault(_class_key(nn.Dense), LinearSpec("weight", "bias", "out_in", "activation", "activation_flag"))
    _LINEAR.setdefault(_class_key(mint.nn.Linear), LinearSpec("weight", "bias", "out_in"))
    _BUILTIN_LINEARS_ADDED.append(True)


def resolve_class(name: str) -> type | None:
    """``"mindspore.nn.Dense"`` -> the class (public aliases work); None if it cannot be imported."""
    module, _, attr = name.rpartition(".")
    if not module:
        return None
    try:
        obj = importlib.import_module(module)
    except ImportError:
        parent = resolve_class(module)
        obj = parent
    if obj is None:
        return None
    value = getattr(obj, attr, None)
    return value if isinstance(value, type) else None


# ---- checks (the `where` table) -----------------------------------------------------------------------------
Check = Callable[[Any, Any], "str | None"]  # (candidate, value) -> reason it fails, or None
_CHECKS: dict[str, Check] = {}


def register_check(name: str):
    """Decorator: register a condition usable as ``where = { <name> = value }``; it returns a reason or None."""

    def wrap(fn: Check) -> Check:
        _CHECKS[name] = fn
        return fn

    return wrap


def name_matches(path: str, pattern: str) -> bool:
    """Does a dotted path match a module pattern? ``"re:<regex>"`` is a regular expression searched in the
    path; otherwise a glob that may match the whole path, any dotted suffix ("lm_head" matches
    "model.lm_head") or any dotted prefix ("encoder" matches "encoder.layer.0.fc")."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    parts = path.split(".") if path else [""]
    candidates = {
        ".".join(parts[i:j])
        for i in range(len(parts))
        for j in range(i + 1, len(parts) + 1)
        if i == 0 or j == len(parts)
    }
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@register_check("include")
def _check_include(cand, value) -> str | None:
    pats = _as_list(value)
    if not any(name_matches(cand.path, p) for p in pats):
        return f"not included: '{cand.path}' matches none of {pats}"
    return None


@register_check("exclude")
def _check_exclude(cand, value) -> str | None:
    for p in _as_list(value):
        if name_matches(cand.path, p):
            return f"excluded by name: '{cand.path}' matches {p!r}"
    return None


def _feature_check(attr: str, op: str):
    def check(cand, value) -> str | None:
        have = getattr(cand, attr)
        if have is None:
            return None
        if (op == "min" and have < value) or (op == "max" and have > value):
            word = "small" if op == "min" else "large"
            return f"too {word}: {attr}={have} ({op}_{attr} = {value})"
        return None

    return check


for _attr in ("in_features", "out_features"):
    register_check(f"min_{_attr}")(_feature_check(_attr, "min"))
    register_check(f"max_{_attr}")(_feature_check(_attr, "max"))


@register_check("dtype")
def _check_dtype(cand, value) -> str | None:
    allowed = _as_list(value)
    if cand.weight_dtype not in allowed:
        return f"weight dtype {cand.weight_dtype} is not one of {allowed}"
    return None


@register_check("allow_shared")
def _check_shared(cand, value) -> str | None:
    # evaluated by the matcher (it knows the weight's other uses); registered so the key validates
    return None


# ---- replacements -----------------------------------------------------------------------------------------------
@dataclass
class Replacement:
    """A named factory: (LinearView, params) -> a quantized Linear cell. ``params`` lists what it accepts."""

    name: str
    build: Callable[..., Any]
    params: dict[str, Any]  # accepted parameter -> default
    scheme: Callable[[dict], str]  # the quantization scheme name (for reports and default bounds)


_REPLACEMENTS: dict[str, Replacement] = {}


def register_replacement(name: str, params: dict[str, Any], scheme: Callable[[dict], str] | str):
    """Decorator: register ``fn(view, **params) -> Cell`` as replacement ``name``."""

    def wrap(fn):
        _REPLACEMENTS[name] = Replacement(name, fn, dict(params), scheme if callable(scheme) else (lambda p: scheme))
        return fn

    return wrap


def replacement(name: str) -> Replacement:
    _builtin_replacements()
    if name not in _REPLACEMENTS:
        raise KeyError(f"unknown replacement {name!r}; known: {sorted(_REPLACEMENTS)}")
    return _REPLACEMENTS[name]


def known_replacements() -> list[str]:
    _builtin_replacements()
    return sorted(_REPLACEMENTS)


def _builtin_replacements() -> None:
    if "linear4bit" in _REPLACEMENTS:
        return
    from . import replacements  # noqa: F401  (registers the built-in ones)


# ---- patterns ----------------------------------------------------------------------------------------------------
NODE_KEYS = {"kind", "type", "op", "callee", "ndim", "attrs", "subclasses"}
KINDS = ("cell", "param", "call")


@dataclass(frozen=True)
class NodeSpec:
    """What a pattern node requires of a NetGraph node."""

    kind: str
    type: tuple[str, ...] = ()
    op: tuple[str, ...] = ()
    callee: tuple[str, ...] = ()
    ndim: int | None = None
    attrs: tuple[tuple[str, Any], ...] = ()
    subclasses: bool = False

    def reason(self, data: dict, obj: Any = None) -> str | None:
        """Why a node does not satisfy this spec (None when it does)."""
        if data.get("kind") != self.kind:
            return f"is a {data.get('kind')}, not a {self.kind}"
        if self.type and not self._type_ok(data, obj):
            return f"type {data.get('type_name')} is not one of {list(self.type)}"
        if self.callee and data.get("callee") not in self.callee:
            what = {"function": "a functional call that cannot be rewritten in place"}.get(data.get("callee"))
            return what or f"call of a {data.get('callee')}, not of a {'/'.join(self.callee)}"
        if self.op and data.get("op") not in self.op:
            return f"op {data.get('op')} is not one of {list(self.op)}"
        if self.ndim is not None and data.get("ndim") != self.ndim:
            return f"parameter is {data.get('ndim')}-D, the pattern needs {self.ndim}-D"
        for k, v in self.attrs:
            if data.get("prim_attrs", {}).get(k) != v:
                return f"{k}={data.get('prim_attrs', {}).get(k)!r}, the pattern needs {v!r}"
        return None

    def _type_ok(self, data: dict, obj: Any) -> bool:
        cls = type(obj) if obj is not None else None
        for name in self.type:
            if name == "@linear":
                if cls is not None and linear_spec(cls) is not None:
                    return True
                continue
            if name in (data.get("type"), data.get("type_name")):
                return True
            target = resolve_class(name)
            if (
                target is not None
                and cls is not None
                and (cls is target or (self.subclasses and issubclass(cls, target)))
            ):
                return True
        return False


@dataclass(frozen=True)
class Pattern:
    """A small graph: named node specs and edges ``(src, dst, {attr: value})``; ``anchor`` is the node the
    match is about (a Linear-like cell or the matmul call)."""

    name: str
    nodes: dict[str, NodeSpec]
    edges: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()
    anchor: str = ""

    def __post_init__(self):
        if not self.nodes:
            raise RuleError(f"pattern {self.name!r}: has no nodes")
        anchor = self.anchor or next(iter(self.nodes))
        object.__setattr__(self, "anchor", anchor)
        if anchor not in self.nodes:
            raise RuleError(f"pattern {self.name!r}: anchor {anchor!r} is not one of its nodes {sorted(self.nodes)}")
        for src, dst, _ in self.edges:
            for end in (src, dst):
                if end not in self.nodes:
                    raise RuleError(f"pattern {self.name!r}: edge names unknown node {end!r}")

    @property
    def level(self) -> str:
        """ "cell" when the anchor is a cell (whole-layer swap), "call" for primitive substitution."""
        return self.nodes[self.anchor].kind


# ---- rules ---------------------------------------------------------------------------------------------------------
@dataclass
class Rule:
    """One rewrite rule. ``pattern`` is a Pattern or the name of one known to the RuleSet."""

    name: str
    pattern: Pattern | str
    rewrite: dict[str, Any]
    where: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    description: str = ""
    source: str = "<python>"

    def __post_init__(self):
        where = f"{self.source}: rule {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise RuleError(f"{self.source}: a rule needs a non-empty 'name'")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise RuleError(f"{where}: 'priority' must be an integer, got {self.priority!r}")
        if not isinstance(self.where, dict):
            raise RuleError(f"{where}: 'where' must be a table, got {type(self.where).__name__}")
        for key in self.where:
            if key not in _CHECKS:
                raise RuleError(f"{where}: unknown condition 'where.{key}'; known: {sorted(_CHECKS)}")
        if not isinstance(self.rewrite, dict) or "to" not in self.rewrite:
            raise RuleError(f"{where}: 'rewrite' must be a table with 'to' naming a replacement")
        try:
            repl = replacement(self.rewrite["to"])
        except KeyError as exc:
            raise RuleError(f"{where}: 'rewrite.to' = {self.rewrite['to']!r}: {exc.args[0]}") from None
        for key in self.rewrite:
            if key != "to" and key not in repl.params:
                raise RuleError(
                    f"{where}: unknown key 'rewrite.{key}' for replacement {repl.name!r}; accepted: {sorted(repl.params)}"
                )

    @property
    def replacement(self) -> Replacement:
        return replacement(self.rewrite["to"])

    def replacement_params(self) -> dict[str, Any]:
        params = dict(self.replacement.params)
        params.update({k: v for k, v in self.rewrite.items() if k != "to"})
        return params

    @property
    def scheme(self) -> str:
        return self.replacement.scheme(self.replacement_params())


class RuleSet:
    """Rules plus the patterns they may name."""

    def __init__(self, rules: Iterable[Rule] = (), patterns: Iterable[Pattern] = ()):
        self.patterns: dict[str, Pattern] = {}
        for p in builtin_patterns():
            self.patterns[p.name] = p
        for p in patterns:
            self.patterns[p.name] = p
        self.rules: list[Rule] = []
        for r in rules:
            self.add(r)

    def add(self, rule: Rule) -> None:
        if isinstance(rule.pattern, str):
            if rule.pattern not in self.patterns:
                raise RuleError(
                    f"{rule.source}: rule {rule.name!r}: unknown pattern {rule.pattern!r}; known: {sorted(self.patterns)}"
                )
            rule.pattern = self.patterns[rule.pattern]
        if any(r.name == rule.name for r in self.rules):
            raise RuleError(f"{rule.source}: rule {rule.name!r} is defined twice")
        self.rules.append(rule)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: RuleSet) -> RuleSet:
        out = RuleSet(patterns=[*self.patterns.values(), *other.patterns.values()])
        for r in [*self.rules, *other.rules]:
            out.add(r)
        return out

    @classmethod
    def from_toml(cls, source: str | Path, text: str | None = None) -> RuleSet:
        """Load rules (and patterns, Linear-like classes) from a TOML file, or from ``text`` named ``source``."""
        src = str(source)
        if text is None:
            try:
                text = Path(source).read_text(encoding="utf-8")
            except OSError as exc:
                raise RuleError(f"{src}: cannot read the rule file: {exc.strerror or exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"{src}: TOML syntax error: {exc}") from None
        return cls._from_data(data, src)

    @classmethod
    def _from_data(cls, data: dict, src: str) -> RuleSet:
        unknown = set(data) - {"pattern", "rule", "linear"}
        if unknown:
            raise RuleError(
                f"{src}: unknown top-level key(s) {sorted(unknown)}; accepted: ['linear', 'pattern', 'rule']"
            )
        for cls_name, spec in (data.get("linear") or {}).items():
            if not isinstance(spec, dict):
                raise RuleError(f"{src}: linear.{cls_name!r} must be a table")
            bad = set(spec) - {"weight", "bias", "layout", "activation", "activation_flag"}
            if bad:
                raise RuleError(f"{src}: linear.{cls_name!r}: unknown key(s) {sorted(bad)}")
            try:
                register_linear(cls_name, **spec)
            except (RuleError, TypeError) as exc:
                raise RuleError(f"{src}: linear.{cls_name!r}: {exc}") from None
        patterns = [_pattern_from_data(name, body, src) for name, body in (data.get("pattern") or {}).items()]
        out = cls(patterns=patterns)
        rules = data.get("rule") or []
        if not isinstance(rules, list):
            raise RuleError(f"{src}: 'rule' must be an array of tables ([[rule]])")
        for i, body in enumerate(rules):
            name = body.get("name", f"#{i + 1}") if isinstance(body, dict) else f"#{i + 1}"
            if not isinstance(body, dict):
                raise RuleError(f"{src}: rule {name}: must be a table")
            bad = set(body) - {"name", "pattern", "priority", "where", "rewrite", "description"}
            if bad:
                raise RuleError(f"{src}: rule {name!r}: unknown key(s) {sorted(bad)}")
            if "pattern" not in body:
                raise RuleError(f"{src}: rule {name!r}: missing key 'pattern'")
            out.add(
                Rule(
                    name=body.get("name", ""),
                    pattern=body["pattern"],
                    rewrite=body.get("rewrite", {}),
                    where=body.get("where", {}),
                    priority=body.get("priority", 0),
                    description=body.get("description", ""),
                    source=src,
                )
            )
        return out

    @classmethod
    def builtin(cls, *families: str) -> RuleSet:
        """The built-in rule families (``rules/<family>.toml``): int8, llm_int8, nf4, fp4, int4."""
        out = cls()
        for fam in families:
            if fam not in BUILTIN_FAMILIES:
                raise ValueError(f"unknown rule family {fam!r}; built-in: {list(BUILTIN_FAMILIES)}")
            out = out + cls.from_toml(f"rules/{fam}.toml", _builtin_text(f"{fam}.toml"))
        return out

    def describe(self) -> list[dict]:
        return [
            {
                "name": r.name,
                "pattern": r.pattern.name,
                "level": r.pattern.level,
                "priority": r.priority,
                "where": r.where,
                "rewrite": r.rewrite,
                "source": r.source,
                "description": r.description,
            }
            for r in sorted(self.rules, key=lambda r: -r.priority)
        ]


BUILTIN_FAMILIES = ("int8", "llm_int8", "nf4", "fp4", "int4")


def _builtin_text(filename: str) -> str:
    try:
        return resources.files("msbnb_pass._rules").joinpath(filename).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree that is not installed
        return (Path(__file__).resolve().parents[1] / "rules" / filename).read_text(encoding="utf-8")


_PATTERNS: list[Pattern] | None = None


def builtin_patterns() -> list[Pattern]:
    """The patterns of rules/patterns.toml (linear-cell, matmul-param, matmul-param-bias)."""
    global _PATTERNS
    if _PATTERNS is None:
        data = tomllib.loads(_builtin_text("patterns.toml"))
        _PATTERNS = [_pattern_from_data(n, b, "rules/patterns.toml") for n, b in data.get("pattern", {}).items()]
    return list(_PATTERNS)


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _pattern_from_data(name: str, body: Any, src: str) -> Pattern:
    where = f"{src}: pattern {name!r}"
    if not isinstance(body, dict):
        raise RuleError(f"{where}: must be a table")
    bad = set(body) - {"nodes", "edges", "anchor"}
    if bad:
        raise RuleError(f"{where}: unknown key(s) {sorted(bad)}; accepted: ['anchor', 'edges', 'nodes']")
    nodes = {}
    for node_name, spec in (body.get("nodes") or {}).items():
        if not isinstance(spec, dict):
            raise RuleError(f"{where}: nodes.{node_name} must be a table")
        bad = set(spec) - NODE_KEYS
        if bad:
            raise RuleError(f"{where}: nodes.{node_name}: unknown key(s) {sorted(bad)}; accepted: {sorted(NODE_KEYS)}")
        if spec.get("kind") not in KINDS:
            raise RuleError(f"{where}: nodes.{node_name}.kind must be one of {KINDS}, got {spec.get('kind')!r}")
        nodes[node_name] = NodeSpec(
            kind=spec["kind"],
            type=_tuple(spec.get("type", ())),
            op=_tuple(spec.get("op", ())),
            callee=_tuple(spec.get("callee", ())),
            ndim=spec.get("ndim"),
            attrs=tuple(sorted((spec.get("attrs") or {}).items())),
            subclasses=bool(spec.get("subclasses", False)),
        )
    edges = []
    for e in body.get("edges") or []:
        if not isinstance(e, (list, tuple)) or len(e) not in (2, 3):
            raise RuleError(f"{where}: each edge must be [src, dst] or [src, dst, {{attrs}}], got {e!r}")
        attrs = tuple(sorted((e[2] if len(e) == 3 else {}).items()))
        edges.append((e[0], e[1], attrs))
    try:
        return Pattern(name=name, nodes=nodes, edges=tuple(edges), anchor=body.get("anchor", ""))
    except RuleError as exc:
        raise RuleError(f"{src}: {exc}") from None


def as_ruleset(spec: Any) -> RuleSet:
    """Anything describing rules -> a RuleSet: a RuleSet, Rule(s), a family name, a TOML path, or a config."""
    from .config import BitsAndBytesConfig, QuantConfig

    if isinstance(spec, RuleSet):
        return spec
    if isinstance(spec, Rule):
        return RuleSet([spec])
    if isinstance(spec, (BitsAndBytesConfig, QuantConfig)):
        from .config_rules import rules_for_config

        return rules_for_config(spec)
    if isinstance(spec, (str, Path)):
        s = str(spec)
        if s in BUILTIN_FAMILIES:
            return RuleSet.builtin(s)
        if s.endswith(".toml") or Path(s).exists():
            return RuleSet.from_toml(s)
        raise ValueError(f"rules: {s!r} is neither a built-in family {list(BUILTIN_FAMILIES)} nor a TOML file")
    if isinstance(spec, Sequence):
        out = RuleSet()
        for item in spec:
            out = out + as_ruleset(item)
        return out
    raise TypeError(
        "rules must be a RuleSet, Rule, list of rules, family name, TOML path, BitsAndBytesConfig or QuantConfig; "
        f"got {type(spec).__name__}"
    )
