"""Declarative rewrite rules: patterns as small graphs, conditions, replacements by name, priorities.

A rule names a pattern (a small graph matched as a subgraph of the NetGraph), conditions (``where``) and
a replacement (``rewrite = { to = "<name>", ... }``). Rules are data: TOML files (the built-in families
live in the top-level ``rules/`` directory) or ``Rule(...)`` in Python::

    [pattern.linear-cell]
    anchor = "lin"
    nodes.lin = { kind = "cell", type = ["@linear"] }   # @linear: any Linear-like class of the RuleSet

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

**A RuleSet owns its state**: its rules, patterns, Linear-like classes, checks (``where`` keys) and
replacements. The built-in ones are immutable tables in this module and ``replacements.py``; nothing is
registered at import time. Loading a file builds a new RuleSet and validates everything (keys, values,
regular expressions, replacement parameters) before returning it; a file that fails to load changes
nothing anywhere. Extending with Python code is an explicit call on a RuleSet you own
(``ruleset.register_linear(MyLinear, weight="w")``, ``ruleset.register_check(...)``,
``ruleset.register_replacement(...)``). The module-level ``register_*`` functions are kept for the
existing API: they set process-wide defaults that RuleSets created *afterwards* start from (explicit calls
only; reading a file never reaches them).

**Rule files never import.** A class name in a file (``[linear."pkg.mod.Class"]``, a pattern's ``type``)
is looked up among modules that are already imported (``sys.modules``, without running any of their
code) when it is needed; a name whose module is not imported stays a name and matches nothing until it
is. Only with an explicit opt-in (``allow_imports=["mypkg."]``, ``msbnb --allow-import mypkg``) are
modules under the listed prefixes imported while the file loads, so that a misspelt class is an error
right away.

A malformed file fails with its path, the line, the rule (or pattern) name and the offending key.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import logging
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import RuleError, did_you_mean
from .replacements import BUILTIN_REPLACEMENTS, Replacement, make_replacement

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_FAMILIES",
    "LinearSpec",
    "NodeSpec",
    "Pattern",
    "Replacement",
    "Rule",
    "RuleError",
    "RuleSet",
    "as_ruleset",
    "builtin_patterns",
    "name_matches",
    "register_check",
    "register_linear",
    "register_replacement",
]

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


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
            raise RuleError(f"layout must be 'out_in' or 'in_out', got {self.layout!r}")
        for key in ("weight", "bias", "activation", "activation_flag"):
            value = getattr(self, key)
            if value is None and key != "weight":
                continue
            if not isinstance(value, str) or not value.isidentifier():
                raise RuleError(f"{key} must be an attribute name (a Python identifier), got {value!r}")


LINEAR_KEYS = ("weight", "bias", "layout", "activation", "activation_flag")

# The built-in Linear-like classes, by public name: resolved among imported modules when a network is matched.
BUILTIN_LINEARS: Mapping[str, LinearSpec] = MappingProxyType(
    {
        "mindspore.nn.Dense": LinearSpec("weight", "bias", "out_in", "activation", "activation_flag"),
        "mindspore.mint.nn.Linear": LinearSpec("weight", "bias", "out_in"),
    }
)


# The built-in embedding (lookup table) classes, by public name -> the attribute holding the [num, dim] table.
# Pattern type "@embedding" matches them; they are rewritten only by rules that name them (opt-in).
BUILTIN_EMBEDDINGS: Mapping[str, str] = MappingProxyType(
    {
        "msbnb_pass.models._layers.Embedding": "weight",
        "mindspore.nn.Embedding": "embedding_table",
        "mindspore.mint.nn.Embedding": "weight",
    }
)


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_loaded(name: str) -> Any:
    """The object a dotted name denotes among *already imported* modules, or None. Imports nothing and
    runs no module code (no ``__getattr__``): only ``sys.modules`` and ``vars()`` are read."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[i:]:
            try:
                obj = vars(obj).get(attr)
            except TypeError:
                return None
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _import_allowed(name: str, allow_imports: Sequence[str]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in allow_imports)


def resolve_class(name: str, allow_imports: Sequence[str] = ()) -> type | None:
    """``"mindspore.nn.Dense"`` -> the class, looked up among imported modules; modules under an
    ``allow_imports`` prefix are imported first. None when it cannot be found without importing."""
    obj = resolve_loaded(name)
    if obj is None and allow_imports and _import_allowed(name, allow_imports):
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            try:
                importlib.import_module(module)
                break
            except ModuleNotFoundError as exc:
                if exc.name is None or not module.startswith(exc.name):
                    raise
        obj = resolve_loaded(name)
    return obj if isinstance(obj, type) else None


def _check_class_name(name: Any, where: str, allow_imports: Sequence[str]) -> None:
    """Refuse what cannot be a class name; with an import opt-in, refuse names that do not resolve."""
    if not isinstance(name, str) or not _DOTTED.match(name):
        raise RuleError(f"{where}: {name!r} is not a qualified class name like 'package.module.Class'")
    obj = resolve_loaded(name)
    if obj is None and _import_allowed(name, allow_imports):
        try:
            obj = resolve_class(name, allow_imports)
        except ImportError as exc:
            raise RuleError(f"{where}: importing for {name!r} failed: {type(exc).__name__}: {exc}") from None
        if obj is None:
            raise RuleError(f"{where}: {name!r} names no class (the import was allowed, the name does not exist)")
    if obj is not None and not isinstance(obj, type):
        raise RuleError(f"{where}: {name!r} is a {type(obj).__name__}, not a class")


# ---- checks (the `where` table) -----------------------------------------------------------------------------
CheckFn = Callable[[Any, Any], "str | None"]  # (candidate, value) -> reason it fails, or None


@dataclass(frozen=True)
class Check:
    """A named condition: ``fn(candidate, value)`` returns why the candidate fails, or None.
    ``validate(value)`` returns the normalised value or raises ValueError (run when a rule is loaded)."""

    name: str
    fn: CheckFn
    validate: Callable[[Any], Any] | None = None


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


def _validate_names(value: Any) -> list[str]:
    names = _as_list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"must be a module name or a list of them (non-empty strings), got {value!r}")
    for n in names:
        if n.startswith("re:"):
            try:
                re.compile(n[3:])
            except re.error as exc:
                raise ValueError(f"{n!r} is not a valid regular expression: {exc}") from None
    return names


def _check_include(cand, value) -> str | None:
    pats = _as_list(value)
    if not any(name_matches(cand.path, p) for p in pats):
        return f"not included: '{cand.path}' matches none of {pats}"
    return None


def _check_exclude(cand, value) -> str | None:
    for p in _as_list(value):
        if name_matches(cand.path, p):
            return f"excluded by name: '{cand.path}' matches {p!r}"
    return None


def _validate_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return value


def _feature_check(attr: str, op: str) -> CheckFn:
    def check(cand, value) -> str | None:
        have = getattr(cand, attr)
        if have is None:
            return None
        if (op == "min" and have < value) or (op == "max" and have > value):
            word = "small" if op == "min" else "large"
            return f"too {word}: {attr}={have} ({op}_{attr} = {value})"
        return None

    return check


WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _validate_dtypes(value: Any) -> list[str]:
    names = _as_list(value)
    bad = [n for n in names if n not in WEIGHT_DTYPES]
    if not names or bad:
        raise ValueError(f"{bad or value!r} is not accepted; accepted: {list(WEIGHT_DTYPES)}")
    return names


def _check_dtype(cand, value) -> str | None:
    allowed = _as_list(value)
    if cand.weight_dtype not in allowed:
        return f"weight dtype {cand.weight_dtype} is not one of {allowed}"
    return None


def _validate_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _check_shared(cand, value) -> str | None:
    return None  # evaluated by the matcher (it knows the weight's other uses)


BUILTIN_CHECKS: Mapping[str, Check] = MappingProxyType(
    {
        "include": Check("include", _check_include, _validate_names),
        "exclude": Check("exclude", _check_exclude, _validate_names),
        "min_in_features": Check("min_in_features", _feature_check("in_features", "min"), _validate_count),
        "max_in_features": Check("max_in_features", _feature_check("in_features", "max"), _validate_count),
        "min_out_features": Check("min_out_features", _feature_check("out_features", "min"), _validate_count),
        "max_out_features": Check("max_out_features", _feature_check("out_features", "max"), _validate_count),
        "dtype": Check("dtype", _check_dtype, _validate_dtypes),
        "allow_shared": Check("allow_shared", _check_shared, _validate_bool),
    }
)


# ---- process-wide defaults set by explicit calls (the module-level register_* API) -------------------------------
@dataclass
class _Defaults:
    linears: dict[type, LinearSpec] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    replacements: dict[str, Replacement] = field(default_factory=dict)


_DEFAULTS = _Defaults()


def register_linear(
    cls: type,
    weight: str = "weight",
    bias: str | None = "bias",
    layout: str = "out_in",
    activation: str | None = None,
    activation_flag: str | None = None,
) -> LinearSpec:
    """Declare a Linear-like class for every RuleSet created from now on in this process.

    Prefer ``ruleset.register_linear(...)`` on a RuleSet you own; this is the process-wide form."""
    if not isinstance(cls, type):
        raise RuleError(
            f'register_linear needs the class itself, got {cls!r}; a rule file can name it with [linear."..."]'
        )
    spec = LinearSpec(weight, bias, layout, activation, activation_flag)
    _DEFAULTS.linears[cls] = spec
    logger.debug("register_linear: %s -> %s (process-wide)", class_name(cls), spec)
    return spec


def register_check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator: a condition usable as ``where = { <name> = value }`` in RuleSets created from now on."""
    _check_check_name(name)

    def wrap(fn: CheckFn) -> CheckFn:
        _DEFAULTS.checks[name] = Check(name, fn)
        return fn

    return wrap


def register_replacement(
    name: str, params: dict[str, Any], scheme: Callable[[dict], str] | str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(view, **params) -> Cell`` as replacement ``name`` in RuleSets created from now on."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _DEFAULTS.replacements[name] = make_replacement(name, fn, params, scheme)
        return fn

    return wrap


def _check_check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise RuleError(f"a check name must be an identifier, got {name!r}")


# ---- patterns ----------------------------------------------------------------------------------------------------
NODE_KEYS = {"kind", "type", "op", "callee", "ndim", "attrs", "subclasses"}
KINDS = ("cell", "param", "call")
LinearLookup = Callable[[type], "LinearSpec | None"]


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

    def reason(
        self,
        data: dict,
        obj: Any = None,
        linear_spec: LinearLookup | None = None,
        embedding_weight: Callable[[type], str | None] | None = None,
    ) -> str | None:
        """Why a node does not satisfy this spec (None when it does). ``linear_spec`` answers ``@linear``,
        ``embedding_weight`` ``@embedding``."""
        if data.get("kind") != self.kind:
            return f"is a {data.get('kind')}, not a {self.kind}"
        if self.type and not self._type_ok(data, obj, linear_spec, embedding_weight):
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

    def _type_ok(
        self,
        data: dict,
        obj: Any,
        linear_spec: LinearLookup | None,
        embedding_weight: Callable[[type], str | None] | None = None,
    ) -> bool:
        cls = type(obj) if obj is not None else None
        for name in self.type:
            if name == "@linear":
                if cls is not None and linear_spec is not None and linear_spec(cls) is not None:
                    return True
                continue
            if name == "@embedding":
                if cls is not None and embedding_weight is not None and embedding_weight(cls) is not None:
                    return True
                continue
            if name in (data.get("type"), data.get("type_name")):
                return True
            target = resolve_loaded(name)
            if (
                isinstance(target, type)
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

    @property
    def target(self) -> str | None:
        """What the anchor is: "embedding" (type ``@embedding`` only), "linear" (``@linear`` or a call), or
        None when the pattern names classes (decided per matched cell)."""
        anchor = self.nodes[self.anchor]
        if anchor.kind == "call" or "@linear" in anchor.type:
            return "linear"
        if anchor.type and all(t == "@embedding" for t in anchor.type):
            return "embedding"
        return None


# ---- rules ---------------------------------------------------------------------------------------------------------
@dataclass
class Rule:
    """One rewrite rule. ``pattern`` is a Pattern or the name of one known to the RuleSet.

    A Rule on its own is only checked for its shape; the names it uses (pattern, ``where`` keys, the
    replacement and its parameters) are checked against the RuleSet it is added to, which keeps a bound
    copy."""

    name: str
    pattern: Pattern | str
    rewrite: dict[str, Any]
    where: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    description: str = ""
    source: str = "<python>"
    line: int | None = field(default=None, compare=False)
    _replacement: Replacement | None = field(default=None, repr=False, compare=False)
    _locate: Callable[[str, int], int | None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        where = self.origin()
        if not isinstance(self.name, str) or not self.name:
            raise RuleError(f"{self.source}: a rule needs a non-empty 'name', got {self.name!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise RuleError(f"{where}: 'priority' must be an integer, got {self.priority!r}")
        if not isinstance(self.where, dict):
            raise RuleError(f"{where}: 'where' must be a table, got {type(self.where).__name__}")
        if not isinstance(self.rewrite, dict) or "to" not in self.rewrite:
            raise RuleError(f"{where}: 'rewrite' must be a table with 'to' naming a replacement")
        if not isinstance(self.pattern, (Pattern, str)):
            raise RuleError(f"{where}: 'pattern' must be a pattern name, got {self.pattern!r}")
        if not isinstance(self.description, str):
            raise RuleError(f"{where}: 'description' must be a string, got {self.description!r}")

    def origin(self, needle: str | None = None) -> str:
        """``file:line: rule 'name'`` (or ``<python>: rule 'name'``) for messages; with ``needle``, the line
        is the first one of the rule's text that mentions it (a key or an offending value)."""
        line = self.line
        if needle and self._locate is not None and self.line:
            line = self._locate(needle, self.line) or self.line
        loc = f"{self.source}:{line}" if line else self.source
        return f"{loc}: rule {self.name!r}"

    @property
    def replacement(self) -> Replacement:
        if self._replacement is not None:
            return self._replacement
        to = self.rewrite["to"]
        table = {**BUILTIN_REPLACEMENTS, **_DEFAULTS.replacements}
        if to not in table:
            raise RuleError(f"{self.origin()}: unknown replacement {to!r}; known: {sorted(table)}")
        return table[to]

    def replacement_params(self) -> dict[str, Any]:
        params = dict(self.replacement.params)
        params.update({k: v for k, v in self.rewrite.items() if k != "to"})
        return params

    @property
    def scheme(self) -> str:
        return self.replacement.scheme(self.replacement_params())

    def with_changes(self, *, rewrite: dict | None = None, where: dict | None = None) -> Rule:
        """An unbound copy with ``rewrite`` / ``where`` entries updated (add it to a RuleSet to validate)."""
        return Rule(
            self.name,
            self.pattern.name if isinstance(self.pattern, Pattern) else self.pattern,
            {**copy.deepcopy(self.rewrite), **(rewrite or {})},
            {**copy.deepcopy(self.where), **(where or {})},
            self.priority,
            self.description,
            self.source,
            self.line,
        )


class RuleSet:
    """Rules plus everything they may name: patterns, Linear-like classes, checks and replacements.

    A new RuleSet starts from the built-in tables (and the process-wide defaults set by the module-level
    ``register_*`` calls); ``register_linear`` / ``register_check`` / ``register_replacement`` extend this
    RuleSet only. Adding a rule validates it against this RuleSet and stores a bound copy.
    """

    def __init__(self, rules: Iterable[Rule] = (), patterns: Iterable[Pattern] = ()):
        self.patterns: dict[str, Pattern] = {p.name: p for p in builtin_patterns()}
        for p in patterns:
            self.patterns[p.name] = p
        # Linear-like classes: by class (Python registrations) and by name (built-ins, rule files)
        self._linear_classes: dict[type, tuple[LinearSpec, str]] = {
            cls: (spec, "register_linear") for cls, spec in _DEFAULTS.linears.items()
        }
        self._linear_names: dict[str, tuple[LinearSpec, str]] = {
            name: (spec, "built-in") for name, spec in BUILTIN_LINEARS.items()
        }
        self._checks: dict[str, Check] = {**BUILTIN_CHECKS, **_DEFAULTS.checks}
        self._replacements: dict[str, Replacement] = {**BUILTIN_REPLACEMENTS, **_DEFAULTS.replacements}
        self._spec_cache: dict[type, LinearSpec | None] = {}
        self._embedding_cache: dict[type, str | None] = {}
        self.rules: list[Rule] = []
        for r in rules:
            self.add(r)

    # ---- extension, explicit and local to this RuleSet ------------------------------------------------------
    def register_linear(
        self,
        cls: type,
        weight: str = "weight",
        bias: str | None = "bias",
        layout: str = "out_in",
        activation: str | None = None,
        activation_flag: str | None = None,
    ) -> LinearSpec:
        """Declare a Linear-like cell class so that this RuleSet's ``@linear`` patterns match it."""
        if not isinstance(cls, type):
            raise RuleError(f"register_linear needs the class itself, got {cls!r}")
        spec = LinearSpec(weight, bias, layout, activation, activation_flag)
        self._linear_classes[cls] = (spec, "register_linear")
        self._spec_cache.clear()
        return spec

    def declare_linear(self, name: str, spec: LinearSpec, source: str) -> None:
        """Declare a Linear-like class by qualified name (what a rule file's ``[linear."..."]`` does)."""
        have = self._linear_names.get(name)
        if have is not None and have[0] != spec:
            raise RuleError(
                f"{source}: linear.{name!r} is already declared by {have[1]} as {_spec_text(have[0])}; "
                f"a rule set cannot give one class two layouts"
            )
        self._linear_names[name] = (spec, source)
        self._spec_cache.clear()

    def register_check(self, name: str, fn: CheckFn | None = None, validate: Callable[[Any], Any] | None = None) -> Any:
        """Add a condition ``where = { <name> = value }`` to this RuleSet (usable as a decorator)."""
        _check_check_name(name)

        def wrap(f: CheckFn) -> CheckFn:
            self._checks[name] = Check(name, f, validate)
            return f

        return wrap(fn) if fn is not None else wrap

    def register_replacement(
        self,
        name: str,
        build: Callable[..., Any] | None = None,
        params: Mapping[str, Any] | None = None,
        scheme: Callable[[dict], str] | str = "custom",
    ) -> Any:
        """Add a replacement ``build(view, **params) -> Cell`` to this RuleSet (usable as a decorator)."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._replacements[name] = make_replacement(name, fn, params or {}, scheme)
            return fn

        return wrap(build) if build is not None else wrap

    # ---- lookups -----------------------------------------------------------------------------------------------
    def linear_spec(self, cls: type) -> LinearSpec | None:
        """The LinearSpec of a class in this RuleSet, or None. Names are resolved among imported modules
        (cached per class; ``refresh()`` forgets the cache, e.g. after more modules were imported)."""
        if cls in self._spec_cache:
            return self._spec_cache[cls]
        spec = self._linear_spec(cls)
        self._spec_cache[cls] = spec
        return spec

    def refresh(self) -> None:
        """Forget which classes the names resolved to (the matcher calls it before each run)."""
        self._spec_cache.clear()
        self._embedding_cache.clear()

    def embedding_weight(self, cls: type) -> str | None:
        """The attribute holding the table of an embedding class (``BUILTIN_EMBEDDINGS``), or None."""
        if cls not in self._embedding_cache:
            attr = BUILTIN_EMBEDDINGS.get(class_name(cls))
            for name, value in BUILTIN_EMBEDDINGS.items():
                if attr is None and resolve_loaded(name) is cls:
                    attr = value
            self._embedding_cache[cls] = attr
        return self._embedding_cache[cls]

    def has_embedding_rules(self) -> bool:
        """Whether a rule replaces lookup tables (then embedding cells are sites of the match trace)."""
        return any(r.replacement.kind == "embedding" for r in self.rules)

    def _linear_spec(self, cls: type) -> LinearSpec | None:
        found: list[tuple[LinearSpec, str]] = []
        if cls in self._linear_classes:
            found.append(self._linear_classes[cls])
        for name, entry in self._linear_names.items():
            if name == class_name(cls) or resolve_loaded(name) is cls:
                found.append(entry)
        if not found:
            return None
        specs = {spec for spec, _ in found}
        if len(specs) > 1:
            raise RuleError(
                f"class {class_name(cls)} has conflicting Linear-like declarations: "
                + "; ".join(f"{src}: {_spec_text(spec)}" for spec, src in found)
            )
        return found[0][0]

    def check(self, key: str) -> Check:
        return self._checks[key]

    def replacement(self, name: str) -> Replacement:
        if name not in self._replacements:
            raise RuleError(
                f"unknown replacement {name!r}{did_you_mean(name, self._replacements)}; known: {sorted(self._replacements)}"
            )
        return self._replacements[name]

    def known_checks(self) -> list[str]:
        return sorted(self._checks)

    def known_replacements(self) -> list[str]:
        return sorted(self._replacements)

    def linear_classes(self) -> list[str]:
        """The Linear-like classes this RuleSet knows (qualified names)."""
        return sorted({*self._linear_names, *(class_name(c) for c in self._linear_classes)})

    # ---- rules -------------------------------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        """Validate ``rule`` against this RuleSet and add a bound copy of it; returns the copy."""
        where = rule.origin()
        pattern = rule.pattern
        if isinstance(pattern, str):
            if pattern not in self.patterns:
                raise RuleError(
                    f"{where}: unknown pattern {pattern!r}{did_you_mean(pattern, self.patterns)}; "
                    f"known: {sorted(self.patterns)}"
                )
            pattern = self.patterns[pattern]
        conditions = {}
        for key, value in rule.where.items():
            if key not in self._checks:
                raise RuleError(
                    f"{rule.origin(key)}: unknown condition 'where.{key}'{did_you_mean(key, self._checks)}; "
                    f"known: {sorted(self._checks)}"
                )
            validate = self._checks[key].validate
            try:
                conditions[key] = validate(value) if validate else copy.deepcopy(value)
            except ValueError as exc:
                bad = next((v for v in _as_list(value) if isinstance(v, str) and v in str(exc)), key)
                raise RuleError(f"{rule.origin(bad)}: where.{key}: {exc}") from None
        to = rule.rewrite["to"]
        if not isinstance(to, str) or to not in self._replacements:
            raise RuleError(
                f"{where}: 'rewrite.to' = {to!r}: unknown replacement {to!r}"
                f"{did_you_mean(str(to), self._replacements)}; known: {sorted(self._replacements)}"
            )
        repl = self._replacements[to]
        target = pattern.target
        if target is not None and target != repl.kind:
            raise RuleError(
                f"{rule.origin('to')}: replacement {to!r} replaces a {repl.kind}, but pattern {pattern.name!r} "
                f"matches {target} {'cells' if target == 'embedding' else 'layers'}; "
                + ("use 'embedding4bit' or 'embedding8bit'" if target == "embedding" else "use a linear replacement")
            )
        for key in rule.rewrite:
            if key != "to" and key not in repl.params:
                raise RuleError(
                    f"{rule.origin(key)}: unknown key 'rewrite.{key}' for replacement {repl.name!r}"
                    f"{did_you_mean(key, repl.params)}; accepted: {sorted(repl.params)}"
                )
        params = {**repl.params, **{k: v for k, v in rule.rewrite.items() if k != "to"}}
        try:
            repl.validate(params)
        except ValueError as exc:
            bad = next((k for k in rule.rewrite if f"rewrite.{k} " in str(exc)), "rewrite")
            raise RuleError(f"{rule.origin(bad)}: {exc} (replacement {repl.name!r})") from None
        if any(r.name == rule.name for r in self.rules):
            raise RuleError(f"{where}: rule {rule.name!r} is defined twice")
        bound = Rule(
            rule.name,
            pattern,
            copy.deepcopy(rule.rewrite),
            conditions,
            rule.priority,
            rule.description,
            rule.source,
            rule.line,
            _replacement=repl,
            _locate=rule._locate,
        )
        self.rules.append(bound)
        return bound

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def copy(self, rules: Iterable[Rule] | None = None) -> RuleSet:
        """A RuleSet with this one's patterns, classes, checks and replacements, and ``rules`` (default:
        this one's rules)."""
        out = RuleSet.__new__(RuleSet)
        out.patterns = dict(self.patterns)
        out._linear_classes = dict(self._linear_classes)
        out._linear_names = dict(self._linear_names)
        out._checks = dict(self._checks)
        out._replacements = dict(self._replacements)
        out._spec_cache = {}
        out._embedding_cache = {}
        out.rules = []
        for r in self.rules if rules is None else rules:
            out.add(r)
        return out

    def __add__(self, other: RuleSet) -> RuleSet:
        if not isinstance(other, RuleSet):
            return NotImplemented
        out = self.copy(rules=())
        out.patterns.update(other.patterns)
        for cls, (spec, src) in other._linear_classes.items():
            have = out._linear_classes.get(cls)
            if have is not None and have[0] != spec:
                raise RuleError(f"{src}: {class_name(cls)} is declared twice with different layouts")
            out._linear_classes[cls] = (spec, src)
        for name, (spec, src) in other._linear_names.items():
            out.declare_linear(name, spec, src)
        out._checks.update(other._checks)
        out._replacements.update(other._replacements)
        for r in [*self.rules, *other.rules]:
            out.add(r)
        return out

    def with_rewrite(self, **params: Any) -> RuleSet:
        """A copy whose rules' replacements that accept ``params`` get them (e.g. ``backend="reference"``)."""
        rules = [
            r.with_changes(rewrite={k: v for k, v in params.items() if k in r.replacement.params}) for r in self.rules
        ]
        return self.copy(rules)

    # ---- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_toml(
        cls,
        source: str | Path,
        text: str | None = None,
        *,
        allow_imports: Sequence[str] = (),
        base: RuleSet | None = None,
    ) -> RuleSet:
        """Load rules (and patterns, Linear-like classes) from a TOML file, or from ``text`` named ``source``.

        With ``base``, the result is a copy of ``base`` (its rules, and the replacements, checks and classes
        registered on it, which the file's rules may then name) plus the file's contents. Nothing is
        imported unless a class name falls under an ``allow_imports`` prefix (e.g. ``["mypkg."]``), and
        nothing outside the returned RuleSet changes (``base`` included), whether loading succeeds or fails."""
        if base is not None and not isinstance(base, RuleSet):
            raise TypeError(f"from_toml: base must be a RuleSet or None, got {type(base).__name__}")
        src = str(source)
        allow = _allow_list(allow_imports)
        if text is None:
            try:
                raw = Path(source).read_bytes()
            except OSError as exc:
                raise RuleError(f"{src}: cannot read the rule file: {exc.strerror or exc}") from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].count(b"\n") + 1
                raise RuleError(f"{src}:{line}: the rule file is not UTF-8 text ({exc.reason})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"{src}: TOML syntax error: {exc}") from None
        return cls._from_data(data, src, text, allow, base)

    @classmethod
    def _from_data(
        cls, data: dict, src: str, text: str = "", allow_imports: Sequence[str] = (), base: RuleSet | None = None
    ) -> RuleSet:
        locate = _Locator(src, text)
        unknown = set(data) - {"pattern", "rule", "linear"}
        if unknown:
            name = sorted(unknown)[0]
            raise RuleError(
                f"{locate(name)}: unknown top-level key(s) {sorted(unknown)}"
                f"{did_you_mean(name, ['linear', 'pattern', 'rule'])}; accepted: ['linear', 'pattern', 'rule']"
            )
        linears = data.get("linear") or {}
        if not isinstance(linears, dict):
            raise RuleError(f"{locate('linear')}: 'linear' must be a table of classes ([linear.\"pkg.Class\"])")
        specs = {}
        for cls_name, spec in linears.items():
            here = f"{locate(cls_name)}: linear.{cls_name!r}"
            if not isinstance(spec, dict):
                raise RuleError(f"{here} must be a table")
            bad = set(spec) - set(LINEAR_KEYS)
            if bad:
                key = sorted(bad)[0]
                raise RuleError(
                    f"{here}: unknown key(s) {sorted(bad)}{did_you_mean(key, LINEAR_KEYS)}; accepted: {list(LINEAR_KEYS)}"
                )
            _check_class_name(cls_name, here, allow_imports)
            try:
                specs[cls_name] = LinearSpec(**spec)
            except RuleError as exc:
                raise RuleError(f"{here}: {exc}") from None
        patterns_data = data.get("pattern") or {}
        if not isinstance(patterns_data, dict):
            raise RuleError(f"{locate('pattern')}: 'pattern' must be a table of patterns ([pattern.name])")
        patterns = [_pattern_from_data(name, body, locate, allow_imports) for name, body in patterns_data.items()]
        if base is None:
            out = cls(patterns=patterns)
        else:
            out = base.copy()
            for p in patterns:
                out.patterns[p.name] = p
        for cls_name, spec in specs.items():
            out.declare_linear(cls_name, spec, f"{locate(cls_name)}")
        rules = data.get("rule") or []
        if not isinstance(rules, list):
            raise RuleError(f"{locate('rule')}: 'rule' must be an array of tables ([[rule]])")
        for i, body in enumerate(rules):
            line = locate.rule_line(i)
            here = f"{src}:{line}" if line else src
            name = body.get("name", f"#{i + 1}") if isinstance(body, dict) else f"#{i + 1}"
            if not isinstance(body, dict):
                raise RuleError(f"{here}: rule {name}: must be a table")
            bad = set(body) - {"name", "pattern", "priority", "where", "rewrite", "description"}
            if bad:
                raise RuleError(
                    f"{here}: rule {name!r}: unknown key(s) {sorted(bad)}; accepted: "
                    "['description', 'name', 'pattern', 'priority', 'rewrite', 'where']"
                )
            if "pattern" not in body:
                raise RuleError(f"{here}: rule {name!r}: missing key 'pattern'")
            out.add(
                Rule(
                    name=body.get("name", ""),
                    pattern=body["pattern"],
                    rewrite=body.get("rewrite", {}),
                    where=body.get("where", {}),
                    priority=body.get("priority", 0),
                    description=body.get("description", ""),
                    source=src,
                    line=line,
                    _locate=locate.line_of,
                )
            )
        return out

    @classmethod
    def builtin(cls, *families: str) -> RuleSet:
        """The built-in rule families (``rules/<family>.toml``): int8, llm_int8, nf4, fp4, int4."""
        out = cls()
        for fam in families:
            if fam not in BUILTIN_FAMILIES:
                raise RuleError(
                    f"unknown rule family {fam!r}{did_you_mean(str(fam), BUILTIN_FAMILIES)}; "
                    f"built-in: {list(BUILTIN_FAMILIES)}"
                )
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


def _spec_text(spec: LinearSpec) -> str:
    return f"weight={spec.weight!r}, bias={spec.bias!r}, layout={spec.layout!r}"


def _allow_list(allow_imports: Any) -> tuple[str, ...]:
    if isinstance(allow_imports, str):
        allow_imports = [allow_imports]
    out = []
    for p in allow_imports or ():
        if not isinstance(p, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?$", p):
            raise RuleError(f"allow_imports: {p!r} is not a module prefix like 'mypkg.' or 'mypkg.layers'")
        out.append(p)
    return tuple(out)


class _Locator:
    """Line numbers for messages about a TOML text (tomllib keeps none): the first line mentioning a key."""

    def __init__(self, src: str, text: str):
        self.src = src
        self.lines = text.splitlines()
        self._rule_lines = [i + 1 for i, line in enumerate(self.lines) if re.match(r"^\s*\[\[\s*rule\s*\]\]", line)]

    def line_of(self, needle: str, start: int = 1) -> int | None:
        for i in range(max(start, 1) - 1, len(self.lines)):
            if needle in self.lines[i]:
                return i + 1
        return None

    def rule_line(self, index: int) -> int | None:
        return self._rule_lines[index] if index < len(self._rule_lines) else None

    def __call__(self, needle: str, start: int = 1) -> str:
        line = self.line_of(needle, start) if needle else None
        return f"{self.src}:{line}" if line else self.src


BUILTIN_FAMILIES = ("int8", "llm_int8", "nf4", "fp4", "int4")


def _builtin_text(filename: str) -> str:
    # a source checkout reads its own rules/ (an editable install's msbnb_pass._rules may be another checkout's)
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "rules" / filename).is_file():
        return (root / "rules" / filename).read_text(encoding="utf-8")
    try:
        return resources.files("msbnb_pass._rules").joinpath(filename).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree that is not installed
        return (root / "rules" / filename).read_text(encoding="utf-8")


@cache
def _builtin_patterns() -> tuple[Pattern, ...]:
    text = _builtin_text("patterns.toml")
    locate = _Locator("rules/patterns.toml", text)
    data = tomllib.loads(text)
    return tuple(_pattern_from_data(n, b, locate, ()) for n, b in data.get("pattern", {}).items())


def builtin_patterns() -> list[Pattern]:
    """The patterns of rules/patterns.toml (linear-cell, embedding-cell, matmul-param, matmul-param-bias)."""
    return list(_builtin_patterns())


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _pattern_from_data(name: str, body: Any, locate: _Locator, allow_imports: Sequence[str]) -> Pattern:
    where = f"{locate(f'pattern.{name}')}: pattern {name!r}"
    if not isinstance(body, dict):
        raise RuleError(f"{where}: must be a table")
    bad = set(body) - {"nodes", "edges", "anchor"}
    if bad:
        raise RuleError(f"{where}: unknown key(s) {sorted(bad)}; accepted: ['anchor', 'edges', 'nodes']")
    nodes = {}
    node_table = body.get("nodes") or {}
    if not isinstance(node_table, dict):
        raise RuleError(f"{where}: 'nodes' must be a table of node specs")
    for node_name, spec in node_table.items():
        if not isinstance(spec, dict):
            raise RuleError(f"{where}: nodes.{node_name} must be a table")
        bad = set(spec) - NODE_KEYS
        if bad:
            key = sorted(bad)[0]
            raise RuleError(
                f"{where}: nodes.{node_name}: unknown key(s) {sorted(bad)}{did_you_mean(key, NODE_KEYS)}; "
                f"accepted: {sorted(NODE_KEYS)}"
            )
        if spec.get("kind") not in KINDS:
            raise RuleError(f"{where}: nodes.{node_name}.kind must be one of {KINDS}, got {spec.get('kind')!r}")
        for key in ("type", "op", "callee"):
            values = _tuple(spec.get(key, ()))
            if not all(isinstance(v, str) and v for v in values):
                raise RuleError(f"{where}: nodes.{node_name}.{key} must be a string or a list of strings")
        for type_name in _tuple(spec.get("type", ())):
            if type_name not in ("@linear", "@embedding") and "." in type_name:
                _check_class_name(type_name, f"{where}: nodes.{node_name}.type", allow_imports)
        ndim = spec.get("ndim")
        if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 0):
            raise RuleError(f"{where}: nodes.{node_name}.ndim must be an integer >= 0, got {ndim!r}")
        attrs = spec.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise RuleError(f"{where}: nodes.{node_name}.attrs must be a table, got {attrs!r}")
        subclasses = spec.get("subclasses", False)
        if not isinstance(subclasses, bool):
            raise RuleError(f"{where}: nodes.{node_name}.subclasses must be true or false, got {subclasses!r}")
        nodes[node_name] = NodeSpec(
            kind=spec["kind"],
            type=_tuple(spec.get("type", ())),
            op=_tuple(spec.get("op", ())),
            callee=_tuple(spec.get("callee", ())),
            ndim=ndim,
            attrs=tuple(sorted(attrs.items())),
            subclasses=subclasses,
        )
    edges = []
    edge_list = body.get("edges") or []
    if not isinstance(edge_list, list):
        raise RuleError(f"{where}: 'edges' must be a list of [src, dst] or [src, dst, {{attrs}}]")
    for e in edge_list:
        if (
            not isinstance(e, (list, tuple))
            or len(e) not in (2, 3)
            or not all(isinstance(v, str) for v in e[:2])
            or (len(e) == 3 and not isinstance(e[2], dict))
        ):
            raise RuleError(f"{where}: each edge must be [src, dst] or [src, dst, {{attrs}}], got {e!r}")
        attrs = tuple(sorted((e[2] if len(e) == 3 else {}).items()))
        edges.append((e[0], e[1], attrs))
    anchor = body.get("anchor", "")
    if not isinstance(anchor, str):
        raise RuleError(f"{where}: 'anchor' must be a node name, got {anchor!r}")
    try:
        return Pattern(name=name, nodes=nodes, edges=tuple(edges), anchor=anchor)
    except RuleError as exc:
        raise RuleError(f"{locate(f'pattern.{name}')}: {exc}") from None


def as_ruleset(spec: Any, *, allow_imports: Sequence[str] = ()) -> RuleSet:
    """Rules described as a RuleSet, Rule(s), a family name or a TOML path -> a RuleSet.

    (A BitsAndBytesConfig / QuantConfig is turned into rules by ``config_rules.rules_for_config``;
    ``passes.apply`` accepts both.)"""
    if isinstance(spec, RuleSet):
        return spec
    if isinstance(spec, Rule):
        return RuleSet([spec])
    if isinstance(spec, (str, Path)):
        s = str(spec)
        if s in BUILTIN_FAMILIES:
            return RuleSet.builtin(s)
        if s.endswith(".toml") or Path(s).exists():
            return RuleSet.from_toml(s, allow_imports=allow_imports)
        raise RuleError(
            f"rules: {s!r} is neither a built-in family {list(BUILTIN_FAMILIES)} nor a TOML file"
            f"{did_you_mean(s, BUILTIN_FAMILIES)}"
        )
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        out = RuleSet()
        for item in spec:
            out = out + as_ruleset(item, allow_imports=allow_imports)
        return out
    raise TypeError(
        "rules must be a RuleSet, Rule, list of rules, family name, TOML path, BitsAndBytesConfig or QuantConfig; "
        f"got {type(spec).__name__}"
    )
