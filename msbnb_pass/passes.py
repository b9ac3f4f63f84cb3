"""The pass: build the graph -> match the rules -> rewrite (verifying layer by layer) -> PassResult.

``apply(net, rules)`` rewrites ``net`` in place (the same object comes back in the result) before it is
compiled; the result compiles and runs in GRAPH_MODE and under ``ms.jit``. ``quantize(net, config)`` is
``apply`` with a BitsAndBytesConfig or QuantConfig turned into rules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import Tensor, nn

from . import calibrate, kernels
from .config_rules import resolve_rules, skip_origins
from .errors import PassError, QuantizationError, RewriteError, closest
from .graph import NetGraph, build_graph
from .lora import LoraConfig, add_lora, lora_targets, split_lora_spec
from .match import Match, MatchTrace, find_matches
from .memory import release_memory
from .mixed import ErrorBudget, MixedPlan, as_budget, choose_formats, measure_cosine
from .rewrite import Transaction, apply_match, forget_compiled_graphs, linear_view, rename_parameters
from .rules import RuleSet, name_matches
from .verify import VIOLATION_ACTIONS, Bound, LayerCheck, Report, bound_for, compare_outputs, fp32_worst_ratio, metrics

logger = logging.getLogger(__name__)

__all__ = ["ErrorBudget", "PassError", "PassResult", "Rewrite", "apply", "explain", "get_qlora_model", "quantize"]

PROBE_ROWS = 8  # synthetic probe rows per layer
KERNEL_CHECK_ROWS = 64  # output rows compared against the reference computation
TRIM_BYTES = 64 << 20  # float weight bytes quantized between two malloc_trim calls


@dataclass
class Rewrite:
    """One rewritten layer."""

    path: str
    rule: str
    level: str  # "cell" or "call"
    scheme: str
    replacement: str  # class of the new cell
    in_features: int
    out_features: int
    bytes_before: int  # the float weight (and bias) that left
    bytes_after: int  # the quantized weight, statistics and bias that came in
    action: str = "quantized"  # or "kept_float" (verification or quantization failed, on_violation="keep_float")
    reason: str = ""  # why a layer was kept in float
    rounding: str = "nearest"  # or "gptq" (calibrated)
    # gptq only: relative output error ||X (W - Q)^T|| / ||X W^T|| on the calibration activations X, of
    # round-to-nearest's codes ("before") and of the calibrated ones ("after")
    error_nearest: float | None = None
    error_calibrated: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PassResult:
    """Everything a report needs: the network, what was rewritten, the verification, both graphs."""

    net: nn.Cell
    rewrites: list[Rewrite]
    report: Report
    graph_before: NetGraph
    graph_after: NetGraph
    trace: MatchTrace
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of every weight-holding layer kept
    rules: list[dict[str, Any]] = field(default_factory=list)  # the rules applied: name, scheme, source, ...
    lora: list[str] = field(default_factory=list)  # layers given LoRA adapters (planned, in a dry run)
    lora_config: LoraConfig | None = None
    mixed: MixedPlan | None = None  # the accuracy-aware mode's choice (apply(..., error_budget=...))
    # calibrated rounding: samples, rows (per layer, the most), seconds = collect_seconds (running the network
    # over the samples, summing X^T X) + quantize_seconds (GPTQ)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.action == "quantized"]

    def bytes_saved(self) -> int:
        return sum(r.bytes_before - r.bytes_after for r in self.quantized)

    def summary(self) -> str:
        lines = []
        head = "dry run: would rewrite" if self.dry_run else "rewrote"
        n_kept = len([r for r in self.rewrites if r.action == "kept_float"])
        before = sum(r.bytes_before for r in self.quantized)
        after = sum(r.bytes_after for r in self.quantized)
        lines.append(
            f"{head} {len(self.quantized)} layer(s)" + (f", kept {n_kept} in float (verification)" if n_kept else "")
        )
        if before:
            lines.append(
                f"weights: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
                f"({after / before:.3f}x, {8 * after / (before / 4):.2f} bits per float32 weight)"
            )
        by_rule: dict[str, int] = {}
        for r in self.quantized:
            by_rule[r.rule] = by_rule.get(r.rule, 0) + 1
        for rule, n in sorted(by_rule.items()):
            lines.append(f"  {rule}: {n}")
        if self.lora_config is not None:
            c = self.lora_config
            lines.append(
                f"{'would add' if self.dry_run else 'added'} LoRA adapters (r={c.r}, lora_alpha={c.lora_alpha}) "
                f"to {len(self.lora)} layer(s)"
            )
        if self.kept:
            lines.append(f"kept {len(self.kept)} weight-holding layer(s) in full precision:")
            lines.extend(f"  {path or '<root>'}: {why}" for path, why in self.kept)
        calibrated = [r for r in self.quantized if r.error_calibrated is not None]
        if calibrated:
            ratios = np.array([r.error_calibrated / r.error_nearest if r.error_nearest else 1.0 for r in calibrated])
            c = self.calibration
            lines.append(
                f"calibrated rounding (gptq) on {len(calibrated)} layer(s), {c.get('samples', 0)} sample(s), "
                f"{c.get('seconds', 0.0):.1f} s: output error vs round-to-nearest median {np.median(ratios):.3f}x "
                f"(best {ratios.min():.3f}x, worst {ratios.max():.3f}x)"
            )
        if self.report.layers:
            worst = max(self.report.layers, key=lambda c: c.metrics["relative_error"])
            lines.append(
                f"verified {len(self.report.layers)} layer(s); worst relative error "
                f"{worst.metrics['relative_error']:.4f} at {worst.path or '<root>'}; "
                f"{len(self.report.violations)} violation(s)"
            )
        if self.report.end_to_end:
            e = self.report.end_to_end
            lines.append(f"end to end: cosine {e['cosine']:.6f}, relative error {e['relative_error']:.4f}")
        if self.mixed is not None:
            lines.extend(self.mixed.summary_lines())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def explain(self, path: str | None = None) -> str:
        return self.trace.explain(path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "rewrites": [r.to_dict() for r in self.rewrites],
            "report": self.report.to_dict(),
            "trace": self.trace.to_dict(),
            "warnings": list(self.warnings),
            "kept": [{"path": p, "reason": r} for p, r in self.kept],
            "lora": list(self.lora),
            "lora_config": self.lora_config.to_peft_dict() if self.lora_config is not None else None,
            "calibration": dict(self.calibration),
            "graph_before": self.graph_before.summary(),
            "graph_after": self.graph_after.summary(),
            "rules": [dict(r) for r in self.rules],
            "mixed": None if self.mixed is None else self.mixed.to_dict(),
        }

    def to_html(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Write a self-contained HTML report (summary, rules, error and memory charts, verification table,
        kept layers, the graph before/after) to ``path`` atomically; see ``msbnb_pass.report_html``."""
        from .report_html import write_html

        return write_html(self, path, title=title)


# ---- activations for probes ---------------------------------------------------------------------------------------
def _capture_inputs(netgraph: NetGraph, net: nn.Cell, matches: list[Match], sample_inputs) -> tuple[dict, Any]:
    """Run the float network once on the sample inputs, recording each matched layer's input rows."""
    captured: dict[str, np.ndarray] = {}

    def keep(key: str, x) -> None:
        arr = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        rows = arr.reshape(-1, arr.shape[-1])
        prev = captured.get(key)
        captured[key] = rows if prev is None else np.concatenate([prev, rows])[: 4 * KERNEL_CHECK_ROWS]

    with calibrate.recording(netgraph, matches, keep):  # the hooks calibration records through, too
        try:
            args = sample_inputs if isinstance(sample_inputs, (tuple, list)) else (sample_inputs,)
            outputs = net(*args)
        except Exception as exc:
            raise PassError(
                f"sample_inputs: running the network on them failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the network is untouched"
            ) from exc
    return captured, outputs


def _probe(cand, captured: dict, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    rows = captured.get(cand.anchor)
    if rows is not None and len(rows):
        return np.ascontiguousarray(rows[: 4 * PROBE_ROWS], dtype=np.float32), "captured"
    # a realistic scale for activations entering a Linear in a normalised network: N(0, 1)
    return rng.standard_normal((PROBE_ROWS, cand.in_features), dtype=np.float32), "synthetic"


def _float_output(view, x: np.ndarray) -> np.ndarray:
    # float32 BLAS on the weight in place (a float64 copy of a large weight would be a memory spike);
    # its rounding (~1e-6 relative) is far below every scheme's bound
    y = (x @ view.weight.T).astype(np.float64)
    if view.bias is not None:
        y = y + view.bias
    return y


def _check_embedding(match: Match, view, layer: nn.Cell, bounds, rng) -> LayerCheck:
    """Looked-up rows of the quantized table vs the float table (scheme bound), and bit for bit vs the
    numpy decoding of the same rows: ``KERNEL_CHECK_ROWS`` random ids and the last one."""
    num = view.in_features
    ids = rng.choice(num, min(num, KERNEL_CHECK_ROWS), replace=False) if num > 1 else np.zeros(1, np.int64)
    ids = np.unique(np.append(ids, num - 1)).astype(np.int32)
    y_q = layer(Tensor(ids)).asnumpy()
    m = metrics(view.weight[ids], y_q)
    exact = np.array_equal(y_q.view(np.uint32), layer.dequantized_rows(ids).view(np.uint32))
    scheme = match.rule.scheme
    return LayerCheck(
        match.candidate.path, scheme, "ids", m, bound_for(scheme, bounds), exact, 0.0 if exact else np.inf
    )


def _check_layer(match: Match, view, layer: nn.Cell, x: np.ndarray, probe: str, bounds, rng) -> LayerCheck:
    """Quantized layer vs the float layer (scheme bound) and its kernel vs the reference (fp32 bound)."""
    if match.candidate.kind == "embedding":
        return _check_embedding(match, view, layer, bounds, rng)
    scheme = match.rule.scheme
    y_q = layer(Tensor(x)).asnumpy().astype(np.float64)
    if view.activation is not None:  # compare before the activation: the matmul is what changed
        y_q_pre = _pre_activation(layer, x)
    else:
        y_q_pre = y_q
    y_f = _float_output(view, x)
    m = metrics(y_f, y_q_pre)
    rows = np.arange(view.out_features)
    if rows.size > KERNEL_CHECK_ROWS:
        rows = np.sort(rng.choice(rows, KERNEL_CHECK_ROWS, replace=False))
    if scheme == "llm_int8":
        from . import formats

        ref = formats.int8_mixed_matmul(
            x,
            layer.weight.asnumpy()[rows],
            layer.SCB.asnumpy()[rows],
            layer.threshold,
            None if view.bias is None else view.bias[rows],
        )
        w_rows = formats.int8_vectorwise_dequant(layer.weight.asnumpy()[rows], layer.SCB.asnumpy()[rows])
        tol = np.abs(x.astype(np.float64)) @ np.abs(w_rows.T) * 8 * 2.0**-24 + np.abs(ref) * 4 * 2.0**-24 + 1e-30
        ratio = float((np.abs(y_q_pre[:, rows] - ref) / tol).max())
    elif getattr(layer, "compute_mode", "float32") != "float32":  # bfloat16 / int8 compute: their own oracle
        ref, tol = layer.kernel_reference(x, rows)
        if view.bias is not None:
            ref = ref + view.bias[rows]
            tol = tol + np.abs(ref) * 2.0**-24
        ratio = float((np.abs(y_q_pre[:, rows] - ref) / tol).max()) if ref.size else 0.0
    else:
        w_rows = layer.dequantized_rows(rows)
        ratio = fp32_worst_ratio(x, w_rows, y_q_pre[:, rows], None if view.bias is None else view.bias[rows])
    return LayerCheck(match.candidate.path, scheme, probe, m, bound_for(scheme, bounds), ratio <= 1.0, ratio)


def _pre_activation(layer: nn.Cell, x: np.ndarray) -> np.ndarray:
    flag = layer.activation_flag
    layer.activation_flag = False
    try:
        return layer(Tensor(x)).asnumpy().astype(np.float64)
    finally:
        layer.activation_flag = flag


def _param_bytes(*params) -> int:
    return int(sum(p.size * p.itemsize for p in params if p is not None))


# ---- the pass ------------------------------------------------------------------------------------------------------
def apply(
    net: nn.Cell,
    rules_or_config: Any,
    *,
    sample_inputs: Any = None,
    calibration: Any = None,
    verify: bool = True,
    on_violation: str = "raise",
    dry_run: bool = False,
    bounds: dict[str, Bound] | None = None,
    backend: str | None = None,
    progress: bool | None = None,
    seed: int = 0,
    allow_imports: Sequence[str] = (),
    error_budget: ErrorBudget | dict | float | None = None,
) -> PassResult:
    """Rewrite ``net`` in place by ``rules_or_config``; return what was done.

    Args:
        net: the network (an ``nn.Cell``), before compiling it.
        rules_or_config: a RuleSet / Rule / list, a built-in family ("nf4", "int8", ...), a TOML file, or a
            BitsAndBytesConfig / QuantConfig. A ``LoraConfig``, the family "lora" or a TOML file with a
            ``[lora]`` table in it (``["nf4", LoraConfig(...)]``) adds LoRA adapters to the layers it targets
            after the rules ran, in the same transaction (QLoRA in one pass).
        sample_inputs: a Tensor or tuple of Tensors the network accepts; each rewritten layer is then
            verified on the activations it really sees, and the whole network end to end.
        calibration: an iterable of argument tuples for ``net(*args)`` (e.g. ``[(ids,), ...]``): the float
            network runs over them and every matched layer's codes are chosen by GPTQ against its real
            input activations instead of round-to-nearest, in the same storage format (a rule's
            ``rewrite.rounding = "nearest"`` opts it out). The per-layer output error before/after is in
            the result's rewrites and summary.
        verify: check every rewritten layer against its float original and its kernel against the
            reference while the float weight still exists.
        on_violation: "raise" (roll everything back and raise), "keep_float" (leave that layer in full
            precision and report it; also for a layer that cannot be quantized, e.g. a NaN in its weight)
            or "warn" (keep the quantized layer, report the violation).
        dry_run: match and explain, change nothing.
        bounds: per-scheme Bound overrides (see ``verify.DEFAULT_BOUNDS``).
        backend: kernel backend of the new layers ("cpu" or "reference"; default: the kernels' choice).
        progress: show a progress bar (default: when there are many layers and stderr is a terminal).
        allow_imports: module prefixes (e.g. ``["mypkg."]``) a TOML rule file may import to find the
            classes it names; without it, reading a rule file never imports anything.
        error_budget: the accuracy-aware mode (needs ``sample_inputs``): measure each layer's sensitivity on
            the sample inputs and give the most sensitive layers a more precise format (INT8, a smaller
            blocksize, float) within a byte budget; see ``msbnb_pass.mixed.ErrorBudget``. A number ``e`` in
            (0, 1) means ``ErrorBudget(min_cosine=1 - e)``. The choice is in ``PassResult.mixed``.

    Raises:
        TypeError: an argument of the wrong type. ``MsbnbError`` subclasses (PassError, RewriteError,
        MatchConflict, RuleError, ConfigError): with a message naming the layer, rule or argument; the
        network is then exactly as it was.
    """
    if not isinstance(net, nn.Cell):
        raise TypeError(f"apply expects a mindspore.nn.Cell, got {type(net).__module__}.{type(net).__name__}")
    if on_violation not in VIOLATION_ACTIONS:
        raise PassError(f"on_violation must be one of {VIOLATION_ACTIONS}, got {on_violation!r}")
    for name, value in (("verify", verify), ("dry_run", dry_run)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if bounds is not None and (not isinstance(bounds, dict) or not all(isinstance(b, Bound) for b in bounds.values())):
        raise TypeError(f"bounds must be a dict of scheme -> verify.Bound, got {bounds!r}")
    rules_or_config, lora_config = split_lora_spec(rules_or_config)
    budget = None
    if error_budget is not None:
        budget = as_budget(error_budget)
        if sample_inputs is None:
            raise PassError("error_budget needs sample_inputs: the layers' sensitivity is measured on them")
        if dry_run:
            raise PassError("error_budget cannot be combined with dry_run (choosing formats runs the network)")
    ruleset = resolve_rules(rules_or_config, allow_imports=allow_imports)
    # LoRA targets are checked on the network as it is (the rules keep every layer's path): a config
    # matching nothing fails here, before anything is rewritten
    lora_planned = lora_targets(net, lora_config) if lora_config is not None else []
    samples = None if calibration is None else calibrate.check_samples(net, calibration)
    if backend is not None:
        if backend not in kernels.available_backends():
            raise PassError(f"backend must be one of {kernels.available_backends()}, got {backend!r}")
        ruleset = ruleset.with_rewrite(backend=backend)  # a copy: the caller's RuleSet is not changed
    graph_before = build_graph(net)
    matches, trace = find_matches(graph_before, ruleset)
    # a built-in family's rule that finds nothing is normal (no bias adds, no matmul calls); a user's is suspicious
    warnings = [
        f"rule {r.name!r} matched nothing"
        for r in ruleset
        if r.name in trace.unused_rules and not r.source.startswith("rules/")
    ]
    calibrate.check_rules(matches, samples is not None)
    origins = skip_origins(rules_or_config)
    warnings += _names_matching_nothing(graph_before, ruleset, origins)
    for w in warnings:
        logger.warning(w)
    if dry_run:
        rewrites = [
            Rewrite(
                m.candidate.path,
                m.rule.name,
                m.candidate.level,
                m.rule.scheme,
                m.rule.rewrite["to"],
                m.candidate.in_features,
                m.candidate.out_features,
                graph_before.node(m.candidate.weight)["nbytes"],
                0,
                action="planned",
            )
            for m in matches
        ]
        kept = _kept_layers(trace, ruleset, origins, [])
        return PassResult(
            net,
            rewrites,
            Report(),
            graph_before,
            graph_before,
            trace,
            dry_run=True,
            warnings=warnings,
            kept=kept,
            rules=_rule_rows(ruleset),
            lora=lora_planned,
            lora_config=lora_config,
        )

    with _pynative():
        return _rewrite(
            net,
            ruleset=ruleset,
            graph_before=graph_before,
            matches=matches,
            trace=trace,
            warnings=warnings,
            sample_inputs=sample_inputs,
            verify=verify,
            on_violation=on_violation,
            bounds=bounds,
            progress=progress,
            seed=seed,
            origins=origins,
            lora_config=lora_config,
            budget=budget,
            samples=samples,
        )


def _names_matching_nothing(graph: NetGraph, ruleset: RuleSet, origins: dict[str, str]) -> list[str]:
    """A skip or target list entry that names no layer is almost always a typo: say so, with the closest
    names. The built-in families' default skip of ``lm_head`` is exempt (most networks have no head)."""
    paths = sorted({p for cid in graph.nodes("cell") for p in graph.node(cid)["paths"] if p})
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    out, seen = [], set()
    for rule in ruleset:
        for key in ("include", "exclude"):
            for pattern in rule.where.get(key, []):
                if (key, pattern) in seen:
                    continue
                seen.add((key, pattern))
                default = rule.source.startswith("rules/") and origins.get(pattern, "").startswith("the default")
                if default or (rule.source.startswith("rules/") and not origins and pattern == "lm_head"):
                    continue
                if any(name_matches(p, pattern) for p in paths):
                    continue
                where = origins.get(pattern) or f"rule {rule.name!r} where.{key}"
                near = closest(pattern.removeprefix("re:"), [*leaves, *paths])
                hint = f"; closest names: {', '.join(near)}" if near else ""
                out.append(f"{where} entry {pattern!r} matches no layer of the network{hint}")
    return out


def _kept_layers(
    trace: MatchTrace, ruleset: RuleSet, origins: dict[str, str], rewrites: list[Rewrite]
) -> list[tuple[str, str]]:
    """(path, why) for every weight-holding layer the pass leaves in full precision."""
    out = []
    for d in trace.decisions:
        if d.rule:
            continue
        why = d.note or "no rule applies"
        ranked = sorted(ruleset, key=lambda r: (-r.priority, r.name))
        # the most specific reason first: a rule for another kind of layer, or "the surrounding graph does not
        # fit", says least
        ranked.sort(key=lambda r: d.reasons.get(r.name, "").startswith(("the surrounding graph", "type ")))
        for rule in ranked:
            reason = d.reasons.get(rule.name)
            if reason is None:
                continue
            why = f"{reason} ({rule.name})"
            if reason.startswith("excluded by name"):
                pattern = next((p for p in rule.where.get("exclude", []) if name_matches(d.path, p)), None)
                if pattern in origins:
                    why = f"skipped by {origins[pattern]} ({pattern!r})"
            break
        out.append((d.path, why))
    out += [(r.path, f"kept in float: {r.reason}") for r in rewrites if r.action == "kept_float"]
    return sorted(out)


def _rule_rows(ruleset: RuleSet) -> list[dict[str, Any]]:
    """What a report says about each rule: name, scheme, replacement, priority and the file:line it came from."""
    rows = []
    for r in ruleset:
        rows.append(
            {
                "name": r.name,
                "scheme": r.scheme,
                "replacement": r.rewrite["to"],
                "priority": r.priority,
                "source": f"{r.source}:{r.line}" if r.line else r.source,
                "description": r.description,
            }
        )
    return rows


@contextlib.contextmanager
def _pynative():
    """Verification calls layers eagerly; in GRAPH_MODE every call would compile a graph."""
    import mindspore as ms

    mode = ms.get_context("mode")
    if mode != ms.PYNATIVE_MODE:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        if mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=mode)


def _rewrite(
    net,
    *,
    ruleset,
    graph_before,
    matches,
    trace,
    warnings,
    sample_inputs,
    verify,
    on_violation,
    bounds,
    progress,
    seed,
    origins,
    lora_config=None,
    budget=None,
    samples=None,
) -> PassResult:
    captured, outputs_before = ({}, None)
    if sample_inputs is not None:
        captured, outputs_before = _capture_inputs(graph_before, net, matches, sample_inputs)
    prebuilt: dict[str, nn.Cell] = {}
    mixed_kept: list[tuple[str, str]] = []
    mixed = None
    if budget is not None:
        matches, prebuilt, mixed_kept, mixed = choose_formats(
            net, graph_before, ruleset, matches, captured, sample_inputs, outputs_before, budget, on_violation
        )
        if samples is not None:  # the formats are chosen on round-to-nearest; the codes then come from GPTQ
            calibrate.check_rules(matches, True)
            for m in matches:
                if calibrate.rounding_of(m.rule, True) == "gptq":
                    prebuilt.pop(m.candidate.path, None)
    cal = None
    to_calibrate = [m for m in matches if calibrate.rounding_of(m.rule, samples is not None) == "gptq"]
    if to_calibrate:
        # probe rows for verification only where the sample inputs do not give them
        probe_rows = 32 if verify and sample_inputs is None else 0
        cal = calibrate.collect(graph_before, net, to_calibrate, samples, probe_rows)
        factors = calibrate.FactorCache(
            [cal.hessians[m.candidate.anchor] for m in to_calibrate if m.candidate.anchor in cal.hessians]
        )
        for key, rows in cal.probes.items():  # verify on real activations rather than synthetic ones
            if len(rows):
                captured.setdefault(key, rows)
    rng = np.random.default_rng(seed)
    txn = Transaction()
    report = Report()
    rewrites: list[Rewrite] = []
    show = progress if progress is not None else (len(matches) >= 16 and sys.stderr.isatty())
    iterator = matches
    if show:
        from tqdm import tqdm

        iterator = tqdm(matches, desc="msbnb_pass", unit="layer")
    try:
        untrimmed = 0
        for m in iterator:
            cand = m.candidate
            rounding = calibrate.rounding_of(m.rule, samples is not None)
            calibrated = None
            try:
                view = linear_view(graph_before, cand)
                layer = prebuilt.pop(cand.path, None)  # built by the accuracy-aware mode
                if layer is None and rounding == "gptq":
                    if cand.anchor not in cal.hessians:
                        raise PassError(
                            f"{cand.path or '<root>'}: the network never ran this layer on the calibration samples, "
                            "so its rounding cannot be calibrated"
                        )
                    t0 = time.perf_counter()
                    layer, calibrated = calibrate.build_calibrated(
                        view,
                        cal.hessians[cand.anchor],
                        m.rule.replacement.name,
                        m.rule.replacement_params(),
                        factors,
                    )
                    cal.quantize_seconds += time.perf_counter() - t0
                elif layer is None:
                    layer = m.rule.replacement.build(view, **m.rule.replacement_params())
            except PassError:
                raise
            except QuantizationError as exc:
                if on_violation != "keep_float":
                    raise RewriteError(
                        f"{cand.path or '<root>'}: rule {m.rule.name!r} cannot quantize this layer: {exc}; the "
                        "network is restored (on_violation='keep_float' keeps such layers in full precision)"
                    ) from exc
                logger.warning("%s: cannot quantize (%s); kept in full precision", cand.path or "<root>", exc)
                nbytes = _param_bytes(graph_before.obj(cand.weight), graph_before.obj(cand.bias) if cand.bias else None)
                rewrites.append(
                    Rewrite(
                        cand.path,
                        m.rule.name,
                        cand.level,
                        m.rule.scheme,
                        m.rule.rewrite["to"],
                        cand.in_features,
                        cand.out_features,
                        nbytes,
                        nbytes,
                        "kept_float",
                        f"cannot quantize: {exc}",
                    )
                )
                continue
            except Exception as exc:
                raise RewriteError(
                    f"{cand.path or '<root>'}: rule {m.rule.name!r} failed to build its "
                    f"replacement: {type(exc).__name__}: {exc}"
                ) from exc
            action, reason = "quantized", ""
            if verify:
                x, probe = _probe(cand, captured, rng)
                check = _check_layer(m, view, layer, x, probe, bounds, rng)
                if not check.passed:
                    message = f"{cand.path or '<root>'}: verification failed ({check.failure()})"
                    if on_violation == "raise":
                        raise RewriteError(message + "; the network is restored")
                    if on_violation == "keep_float":
                        action = check.action = "kept_float"
                        reason = f"verification failed ({check.failure()})"
                        logger.warning("%s; kept in full precision", message)
                    else:
                        check.action = "quantized (violation)"
                        logger.warning(message)
                report.layers.append(check)
            before = _param_bytes(graph_before.obj(cand.weight), graph_before.obj(cand.bias) if cand.bias else None)
            after = layer.parameter_nbytes() if action == "quantized" else before
            if cand.shared:  # a quantized copy: the float weight stays for its other uses
                before = 0
            elif action == "quantized" and cand.level == "call":  # the one-element placeholders left behind
                after += sum(int(graph_before.obj(p).itemsize) for p in (cand.weight, cand.bias) if p)
            rewrites.append(
                Rewrite(
                    cand.path,
                    m.rule.name,
                    cand.level,
                    m.rule.scheme,
                    type(layer).__name__,
                    cand.in_features,
                    cand.out_features,
                    before,
                    after,
                    action,
                    reason,
                    rounding,
                    None if calibrated is None else calibrated.error_nearest,
                    None if calibrated is None else calibrated.error,
                )
            )
            if cal is not None:
                cal.hessians.pop(cand.anchor, None)  # its memory goes with the layer
            # hand the layers' quantization temporaries back before the next ones, once they add up to
            # TRIM_BYTES (a trim costs tens of ms: per layer on a large model, every few dozen on a small one)
            untrimmed += view.weight.nbytes
            del view
            if untrimmed >= TRIM_BYTES:
                release_memory(collect=False)
                untrimmed = 0
            if action == "quantized":
                try:
                    apply_match(txn, graph_before, net, m, layer)
                except RewriteError:
                    raise
                except Exception as exc:
                    raise RewriteError(f"{cand.path or '<root>'}: rewrite failed: {type(exc).__name__}: {exc}") from exc
        lora = add_lora(net, lora_config, transaction=txn) if lora_config is not None else []
        rename_parameters(txn, net)
        forget_compiled_graphs(net)  # GRAPH_MODE: the next call compiles the rewritten network
        if sample_inputs is not None:
            args = sample_inputs if isinstance(sample_inputs, (tuple, list)) else (sample_inputs,)
            report.end_to_end = compare_outputs(outputs_before, net(*args))
        if mixed is not None and cal is not None:
            mixed.calibrated_cosine = measure_cosine(net, sample_inputs, outputs_before, budget.output_fn)
            if mixed.calibrated_cosine < budget.min_cosine:
                message = (
                    f"error_budget: with calibrated rounding the chosen formats measure cosine "
                    f"{mixed.calibrated_cosine:.5f} < min_cosine {budget.min_cosine} on the sample inputs "
                    f"(round-to-nearest measured {mixed.measured_cosine:.5f})"
                )
                if on_violation != "warn":
                    raise PassError(message + "; the network is restored")
                logger.warning(message)
                mixed.notes.append(message)
    except BaseException:
        txn.rollback()
        forget_compiled_graphs(net)
        raise
    txn.commit()
    graph_after = build_graph(net)
    graph_before._objects = {}  # drop the references to the replaced float layers: their memory goes now
    kept = sorted(_kept_layers(trace, ruleset, origins, rewrites) + mixed_kept)
    result = PassResult(
        net,
        rewrites,
        report,
        graph_before,
        graph_after,
        trace,
        warnings=warnings,
        kept=kept,
        rules=_rule_rows(ruleset),
        lora=lora,
        lora_config=lora_config,
        mixed=mixed,
    )
    if cal is not None:
        result.calibration = {
            "samples": cal.samples,
            "rows": max(cal.rows.values(), default=0),
            "seconds": cal.seconds + cal.quantize_seconds,
            "collect_seconds": cal.seconds,
            "quantize_seconds": cal.quantize_seconds,
        }
    release_memory()
    return result


def get_qlora_model(net: nn.Cell, config: LoraConfig, rules: Any = "nf4", **apply_kwargs: Any) -> nn.Cell:
    """A float network -> a QLoRA network in one pass: ``apply(net, [rules, config])`` quantizes with
    ``rules`` (default the built-in "nf4" family; None adds adapters only, to whatever the model holds)
    and adds LoRA to the layers ``config`` targets, in one transaction. Returns ``net`` (rewritten in place)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if rules is None:
        add_lora(net, config)
        return net
    spec = list(rules) if isinstance(rules, (list, tuple)) else [rules]
    apply(net, [*spec, config], **apply_kwargs)
    return net


def quantize(net: nn.Cell, config: Any, **kwargs: Any) -> PassResult:
    """``apply`` with a ``BitsAndBytesConfig`` (or the seed's QuantConfig) mapped onto rules: every
    Linear-like layer and ``self.matmul(x, self.w)`` call, minus the skipped modules (the output head
    ``lm_head`` always, plus ``llm_int8_skip_modules``)."""
    from .config import BitsAndBytesConfig, QuantConfig

    if not isinstance(config, (BitsAndBytesConfig, QuantConfig)):
        raise TypeError(f"quantize expects a BitsAndBytesConfig or QuantConfig, got {type(config).__name__}")
    return apply(net, config, **kwargs)


def explain(net: nn.Cell, rules_or_config: Any) -> MatchTrace:
    """Why each weight-holding node would or would not be rewritten (nothing is changed)."""
    return apply(net, rules_or_config, dry_run=True).trace
