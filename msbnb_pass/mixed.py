"""Accuracy-aware mixed precision: ``apply(net, rules, sample_inputs=..., error_budget=...)``.

bitsandbytes gives every layer the same format. Layers are not equally sensitive, though: on
all-MiniLM-L6-v2 a few of the 36 Dense layers carry most of NF4's error. Given sample inputs and a
budget, this module picks a format per layer:

1. **Candidates.** For every layer the rules would rewrite with a weight-only format (``linear4bit`` /
   ``linear8bit``), the rule's own format (the *base*) plus more precise ones: by default the same 4-bit
   code at half the blocksize, INT8 (one scale per output channel) and float (the layer is left alone).
   Each candidate is built once with the real replacement, so its bytes are exact and the cell is reused
   by the rewrite.
2. **Sensitivity.** The float network runs on the sample inputs with only that layer's weight replaced
   by its base-format dequantization (fake quantization, restored afterwards): the end-to-end error
   ``1 - mean cosine`` of the outputs is the layer's measured sensitivity ``d(base)``. Other formats are
   estimated from it by the ratio of the layer's own output error on its captured activations,
   ``d(f) = d(base) * |dW_f X|^2 / |dW_base X|^2`` (``1 - cos`` is quadratic in a small perturbation).
   One more run with every layer at its base format calibrates how the per-layer errors add up.
3. **Choice.** Errors are modelled as additive; choosing one format per layer to minimise the summed
   error under a byte cap is a multiple-choice knapsack, solved exactly by dynamic programming over the
   bytes (those above the cheapest mix, rounded up to 1/4096 of the room, so the cap holds). Unlike a greedy pick by error saved per
   byte, it can trade one expensive upgrade for several cheaper ones.
4. **Verification and repair.** The chosen mix is measured on the sample inputs. When a ``min_cosine``
   is asked for and the measurement falls short of the prediction, the model is rescaled by what was
   measured and the choice solved again (a few rounds); a budget that still cannot be met raises.

The network is only touched by the fake quantization, which every path restores exactly; the rewrite
itself is the pass's ordinary transactional one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mindspore import Tensor

from .errors import PassError
from .match import Match
from .rewrite import linear_view

logger = logging.getLogger(__name__)

__all__ = ["ErrorBudget", "LayerChoice", "MixedPlan", "as_budget", "choose_formats", "parse_format"]

WEIGHT_ONLY = ("linear4bit", "linear8bit")
FOUR_BIT = ("nf4", "fp4", "int4")
DP_UNITS = 4096  # resolution of the byte axis of the knapsack (bytes above the cheapest mix)
REPAIR_ROUNDS = 4
SHOWN = 6  # upgraded layers named in the summary (to_dict has them all)
_FORMAT_RE = re.compile(r"^(nf4|fp4|int4)(?::(\d+))?$")


@dataclass(frozen=True)
class ErrorBudget:
    """What the accuracy-aware mode must reach, measured on the sample inputs.

    Attributes:
        min_cosine: the mean cosine similarity between the float and the quantized network's output rows
            that the mix must reach. Alone, the mode spends the fewest bytes that reach it.
        max_bytes_ratio: the mix's weight bytes at most this multiple of the weight bytes with every
            layer at its rule's format. Alone, the mode maximises the cosine within it; with
            ``min_cosine`` too, it maximises the cosine within it and raises if that is below min_cosine.
        candidates: formats to choose from besides the rule's own: "int8", "float", or a 4-bit code with
            an optional blocksize ("nf4", "nf4:32", "fp4:64", "int4:128"). Default: the rule's 4-bit code at
            half its blocksize (when that is >= 32), "int8" and "float".
        output_fn: ``output_fn(outputs, inputs) -> array [rows, features]``: the vectors compared (e.g.
            mean-pooled sentence embeddings). Default: the first output's rows along its last axis.
    """

    min_cosine: float | None = None
    max_bytes_ratio: float | None = None
    candidates: tuple[str, ...] | None = None
    output_fn: Callable[[Any, tuple], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.max_bytes_ratio is None:
            raise PassError("error_budget: give min_cosine, max_bytes_ratio or both")
        if self.min_cosine is not None:
            if isinstance(self.min_cosine, bool) or not isinstance(self.min_cosine, (int, float)):
                raise PassError(f"error_budget: min_cosine must be a number in (0, 1), got {self.min_cosine!r}")
            if not 0.0 < self.min_cosine < 1.0:
                raise PassError(f"error_budget: min_cosine must be in (0, 1), got {self.min_cosine!r}")
        if self.max_bytes_ratio is not None:
            bad = isinstance(self.max_bytes_ratio, bool) or not isinstance(self.max_bytes_ratio, (int, float))
            if bad or not (self.max_bytes_ratio > 0 and math.isfinite(self.max_bytes_ratio)):
                raise PassError(
                    f"error_budget: max_bytes_ratio must be a positive finite number (a multiple of the "
                    f"all-base-format bytes, e.g. 1.2), got {self.max_bytes_ratio!r}"
                )
        if self.candidates is not None:
            if isinstance(self.candidates, str) or not all(isinstance(c, str) for c in self.candidates):
                raise PassError(f"error_budget: candidates must be a list of format names, got {self.candidates!r}")
            object.__setattr__(self, "candidates", tuple(self.candidates))
            for c in self.candidates:
                parse_format(c, "error_budget: candidates")
        if self.output_fn is not None and not callable(self.output_fn):
            raise PassError(f"error_budget: output_fn must be callable, got {self.output_fn!r}")

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"min_cosine={self.min_cosine}")
        if self.max_bytes_ratio is not None:
            parts.append(f"max_bytes_ratio={self.max_bytes_ratio}")
        return ", ".join(parts)


def as_budget(value: Any) -> ErrorBudget:
    """An ErrorBudget from what ``apply`` accepts: an ErrorBudget, a dict of its fields, or a float ``e`` in
    (0, 1) meaning ``min_cosine = 1 - e`` (the allowed mean cosine distance)."""
    if isinstance(value, ErrorBudget):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(ErrorBudget)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise PassError(f"error_budget: unknown key(s) {unknown}; accepted: {sorted(known)}")
        return ErrorBudget(**value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 < value < 1.0:
            raise PassError(
                f"error_budget: a number is the allowed mean cosine distance (1 - cosine) and must be in (0, 1), "
                f"got {value!r}"
            )
        return ErrorBudget(min_cosine=1.0 - float(value))
    raise PassError(
        f"error_budget must be an ErrorBudget, a dict of its fields or a number in (0, 1), got {type(value).__name__}"
    )


def parse_format(spec: str, where: str, base: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A format name -> the rewrite table that builds it (None for "float")."""
    if spec == "float":
        return None
    if spec == "int8":
        return {"to": "linear8bit", "symmetric": True, "per_channel": True}
    m = _FORMAT_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise PassError(
            f"{where}: unknown format {spec!r}; accepted: 'float', 'int8', or nf4/fp4/int4 with an optional "
            "blocksize ('nf4', 'nf4:32')"
        )
    blocksize = int(m.group(2)) if m.group(2) else int((base or {}).get("blocksize", 64))
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise PassError(f"{where}: format {spec!r}: the blocksize must be a power of two in [32, 4096]")
    double_quant = bool((base or {}).get("double_quant", True))
    return {"to": "linear4bit", "quant_type": m.group(1), "blocksize": blocksize, "double_quant": double_quant}


def format_label(rewrite: dict[str, Any] | None) -> str:
    """The short name of a rewrite table's format ("nf4:64", "int8", "float")."""
    if rewrite is None:
        return "float"
    if rewrite["to"] == "linear8bit":
        return "int8"
    return f"{rewrite.get('quant_type', 'nf4')}:{rewrite.get('blocksize', 64)}"


@dataclass
class LayerChoice:
    """One layer's options and the format chosen for it."""

    path: str
    base: str
    chosen: str
    bytes: dict[str, int]  # format -> weight bytes
    sensitivity: dict[str, float]  # format -> end-to-end 1 - cosine with only this layer quantized so
    measured: str  # the format whose sensitivity was measured end to end (the others are estimated); "" for a
    # layer that did not run on the sample inputs (sensitivity 0)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MixedPlan:
    """The accuracy-aware mode's outcome (``PassResult.mixed``)."""

    budget: ErrorBudget
    layers: list[LayerChoice]
    base_cosine: float  # measured, every layer at its rule's format
    predicted_cosine: float
    measured_cosine: float  # the chosen mix, on the sample inputs
    base_bytes: int
    bytes: int
    rounds: int  # knapsack solves (1 + repairs)
    forward_runs: int
    notes: list[str] = field(default_factory=list)
    # with calibration: the chosen formats built by GPTQ instead of round-to-nearest, on the same inputs
    calibrated_cosine: float | None = None

    @property
    def bytes_ratio(self) -> float:
        return self.bytes / self.base_bytes if self.base_bytes else 1.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.chosen] = out.get(layer.chosen, 0) + 1
        return dict(sorted(out.items()))

    def summary_lines(self) -> list[str]:
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts().items())
        lines = [
            f"accuracy-aware ({self.budget.describe()}): {counts}",
            f"  output cosine on the sample inputs: all-base {self.base_cosine:.5f}, mix predicted "
            f"{self.predicted_cosine:.5f}, measured {self.measured_cosine:.5f}",
            f"  weight bytes {self.bytes / 2**20:.2f} MiB = {self.bytes_ratio:.3f}x all-base "
            f"({self.base_bytes / 2**20:.2f} MiB); {self.forward_runs} forward runs, {self.rounds} solve(s)",
        ]
        if self.calibrated_cosine is not None:
            lines.append(
                f"  with calibrated rounding (gptq) of the chosen formats: measured {self.calibrated_cosine:.5f}"
            )
        upgraded = [c for c in self.layers if c.chosen != c.base]
        if upgraded:
            # the biggest upgrades first, then the most sensitive layers
            upgraded.sort(key=lambda c: (c.bytes[c.base] - c.bytes[c.chosen], -c.sensitivity[c.base]))
            shown = ", ".join(f"{c.path} ({c.chosen})" for c in upgraded[:SHOWN])
            more = f" and {len(upgraded) - SHOWN} more" if len(upgraded) > SHOWN else ""
            lines.append(f"  more precise than {self.layers[0].base}: {shown}{more}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": {
                "min_cosine": self.budget.min_cosine,
                "max_bytes_ratio": self.budget.max_bytes_ratio,
                "candidates": list(self.budget.candidates) if self.budget.candidates else None,
            },
            "layers": [c.to_dict() for c in self.layers],
            "base_cosine": self.base_cosine,
            "predicted_cosine": self.predicted_cosine,
            "measured_cosine": self.measured_cosine,
            "calibrated_cosine": self.calibrated_cosine,
            "base_bytes": self.base_bytes,
            "bytes": self.bytes,
            "bytes_ratio": self.bytes_ratio,
            "counts": self.counts(),
            "rounds": self.rounds,
            "forward_runs": self.forward_runs,
            "notes": list(self.notes),
        }


# ---- outputs and their error ---------------------------------------------------------------------------------------
def default_rows(outputs: Any, inputs: tuple) -> np.ndarray:
    """The first output's rows along its last axis (float64)."""
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    arr = first.asnumpy() if hasattr(first, "asnumpy") else np.asarray(first)
    return arr.astype(np.float64).reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)


def mean_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean over rows of the cosine similarity (rows that are zero in both count as equal)."""
    num = (ref * out).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.abs(ref - out).sum(axis=1) == 0, 1.0, 0.0))
    return float(cos.mean())


class _Runner:
    """Runs the float network on the sample inputs with some weights swapped for fake-quantized ones."""

    def __init__(self, net, args: tuple, reference_outputs: Any, output_fn):
        self.net = net
        self.args = args
        self.output_fn = output_fn or default_rows
        self.ref = self._rows(reference_outputs)
        self.runs = 0

    def _rows(self, outputs) -> np.ndarray:
        rows = np.asarray(self.output_fn(outputs, self.args), dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise PassError(f"error_budget: output_fn must return a non-empty 2-D array, got shape {rows.shape}")
        return rows

    def error(self, swaps: dict[Any, np.ndarray]) -> float:
        """``1 - mean cosine`` of the outputs with ``swaps`` (Parameter -> data) in place, then restored."""
        saved = []
        try:
            for param, data in swaps.items():
                saved.append((param, param.asnumpy().copy()))
                param.set_data(Tensor(data.astype(saved[-1][1].dtype, copy=False)))
            self.runs += 1
            out = self._rows(self.net(*self.args))
        finally:
            for param, data in reversed(saved):
                param.set_data(Tensor(data))
        if out.shape != self.ref.shape:
            raise PassError(f"error_budget: output_fn returned shape {out.shape}, the float network's {self.ref.shape}")
        return max(0.0, 1.0 - mean_cosine(self.ref, out))


def measure_cosine(net, sample_inputs, reference_outputs: Any, output_fn=None) -> float:
    """Mean cosine of ``net``'s outputs on ``sample_inputs`` to ``reference_outputs``, compared as the
    accuracy-aware mode compares them (through ``output_fn``)."""
    args = tuple(sample_inputs) if isinstance(sample_inputs, (tuple, list)) else (sample_inputs,)
    return 1.0 - _Runner(net, args, reference_outputs, output_fn).error({})


# ---- the knapsack ----------------------------------------------------------------------------------------------------
def solve(errors: list[list[float]], sizes: list[list[int]], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiple-choice knapsack by dynamic programming: one option per layer, summed size <= capacity.

    Returns ``best[c]`` (the least summed error with total size <= c units, inf where infeasible) and the
    choice table for :func:`backtrack`. Sizes are integers (units)."""
    best = np.zeros(capacity + 1)  # no layers yet: error 0 at any capacity
    table = []
    for errs, szs in zip(errors, sizes, strict=True):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for k, (e, s) in enumerate(zip(errs, szs, strict=True)):
            if s > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[s:] = best[: capacity + 1 - s] + e
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        table.append(pick)
    return best, np.array(table)


def backtrack(table: np.ndarray, sizes: list[list[int]], c: int) -> list[int]:
    out = []
    for layer in range(len(sizes) - 1, -1, -1):
        k = int(table[layer][c])
        out.append(k)
        c -= sizes[layer][k]
    return out[::-1]


# ---- the mode --------------------------------------------------------------------------------------------------------
@dataclass
class _Option:
    label: str
    rewrite: dict[str, Any] | None
    layer: Any  # the built cell (None for float)
    nbytes: int
    local: float  # |dW X|^2 on the captured activations
    sensitivity: float = 0.0


def _candidates(budget: ErrorBudget, base: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    base_label = format_label(base)
    if budget.candidates is not None:
        specs = list(budget.candidates)
    else:
        specs = []
        if base["to"] == "linear4bit" and int(base.get("blocksize", 64)) >= 64:
            specs.append(f"{base.get('quant_type', 'nf4')}:{int(base.get('blocksize', 64)) // 2}")
        specs += ["int8", "float"]
    out: list[tuple[str, dict[str, Any] | None]] = [(base_label, base)]
    for spec in specs:
        rw = parse_format(spec, "error_budget: candidates", base)
        label = format_label(rw)
        if label not in [x[0] for x in out]:
            if rw is not None and base.get("backend") is not None:
                rw["backend"] = base["backend"]
            out.append((label, rw))
    return out


def choose_formats(
    net,
    graph,
    ruleset,
    matches: list[Match],
    captured: dict[str, np.ndarray],
    sample_inputs: Any,
    outputs_before: Any,
    budget: ErrorBudget,
    on_violation: str,
) -> tuple[list[Match], dict[str, Any], list[tuple[str, str]], MixedPlan]:
    """Pick a format per layer (see the module docstring).

    Returns the matches to rewrite (each with a rule for its chosen format), the prebuilt cells by layer
    path, the layers left in float with why, and the plan. The network is as it was when this returns
    or raises."""
    args = tuple(sample_inputs) if isinstance(sample_inputs, (tuple, list)) else (sample_inputs,)
    runner = _Runner(net, args, outputs_before, budget.output_fn)
    eligible = [m for m in matches if m.rule.rewrite.get("to") in WEIGHT_ONLY and not m.candidate.shared]
    if not eligible:
        raise PassError(
            "error_budget: no layer is rewritten with a weight-only format (linear4bit or linear8bit); "
            f"the rules use {sorted({m.rule.rewrite.get('to') for m in matches}) or 'nothing'}"
        )
    options: list[list[_Option]] = []
    params = []
    idle: set[int] = set()
    for m in eligible:
        cand = m.candidate
        view = linear_view(graph, cand)
        param = graph.obj(cand.weight)
        params.append(param)
        x = captured.get(cand.anchor)
        if x is None or not len(x):  # the layer did not run on the sample inputs: it cannot change the outputs
            idle.add(len(params) - 1)
            x = np.random.default_rng(0).standard_normal((32, cand.in_features)).astype(np.float32)
        x = np.asarray(x, np.float64)
        base = dict(m.rule.rewrite)
        opts = []
        for label, rw in _candidates(budget, base):
            if rw is None:
                opts.append(_Option(label, None, None, int(view.weight.size * 4), 0.0))
                continue
            rep = ruleset.replacement(rw["to"])
            kwargs = dict(rep.params)
            kwargs.update({k: v for k, v in rw.items() if k != "to"})
            try:
                rep.validate(kwargs)
                layer = rep.build(view, **kwargs)
            except Exception as exc:
                if label == format_label(base):
                    raise
                logger.info("%s: format %s does not apply (%s)", cand.path, label, exc)
                continue
            dw = layer.dequantized_weight().astype(np.float64) - view.weight
            local = float(np.square(x @ dw.T).sum())
            opts.append(_Option(label, rw, layer, int(layer.weight_nbytes()), local))
        options.append(opts)
        del view

    def fake(i: int, opt: _Option) -> np.ndarray:
        w = opt.layer.dequantized_weight().astype(np.float32)
        return np.ascontiguousarray(w.T) if eligible[i].candidate.layout == "in_out" else w

    # sensitivity: end to end with only this layer at its base format; the others by the local-error ratio
    for i, opts in enumerate(options):
        base = opts[0]
        base.sensitivity = 0.0 if i in idle else runner.error({params[i]: fake(i, base)})
        for opt in opts[1:]:
            opt.sensitivity = 0.0 if opt.layer is None or base.local <= 0 else base.sensitivity * opt.local / base.local
    base_error = runner.error({params[i]: fake(i, opts[0]) for i, opts in enumerate(options)})
    summed = sum(opts[0].sensitivity for opts in options)
    scale = base_error / summed if summed > 0 else 1.0  # how the layers' errors add up on this network

    base_bytes = sum(opts[0].nbytes for opts in options)
    cheapest = sum(min(o.nbytes for o in opts) for opts in options)
    most = sum(max(o.nbytes for o in opts) for opts in options)
    cap = most if budget.max_bytes_ratio is None else min(most, int(budget.max_bytes_ratio * base_bytes))
    if cheapest > cap:
        raise PassError(
            f"error_budget: max_bytes_ratio={budget.max_bytes_ratio} allows {cap} bytes, but the cheapest choice "
            f"of the candidates takes {cheapest} ({cheapest / base_bytes:.3f}x the all-base bytes)"
        )
    # sizes count the bytes above each layer's cheapest option, rounded up: the cheapest mix is exactly
    # feasible and a rounded choice never exceeds the cap
    floor = [min(o.nbytes for o in opts) for opts in options]
    unit = max(1, math.ceil((cap - cheapest) / DP_UNITS))
    sizes = [[math.ceil((o.nbytes - f) / unit) for o in opts] for opts, f in zip(options, floor, strict=True)]
    errors = [[o.sensitivity for o in opts] for opts in options]
    capacity = (cap - cheapest) // unit
    best, table = solve(errors, sizes, capacity)
    target = None if budget.min_cosine is None else 1.0 - budget.min_cosine

    def pick(scale_now: float) -> list[int]:
        if target is None or budget.max_bytes_ratio is not None:
            return backtrack(table, sizes, capacity)
        ok = np.nonzero(best * scale_now <= target)[0]
        return backtrack(table, sizes, int(ok[0]) if len(ok) else capacity)

    notes: list[str] = []
    rounds = 1
    choice = pick(scale)
    predicted = scale * sum(errors[i][k] for i, k in enumerate(choice))
    measured = runner.error({params[i]: fake(i, options[i][k]) for i, k in enumerate(choice) if options[i][k].layer})
    first_predicted = predicted
    # repair (fewest-bytes mode): rescale the additive model by what was measured and solve again
    while target is not None and budget.max_bytes_ratio is None and measured > target and rounds <= REPAIR_ROUNDS:
        modelled = sum(errors[i][k] for i, k in enumerate(choice))
        if modelled <= 0:
            break
        scale = max(scale, measured / modelled) * 1.02
        new = pick(scale)
        rounds += 1
        if new == choice:
            break
        choice = new
        predicted = scale * sum(errors[i][k] for i, k in enumerate(choice))
        measured = runner.error(
            {params[i]: fake(i, options[i][k]) for i, k in enumerate(choice) if options[i][k].layer}
        )
    if target is not None and measured > target:
        message = (
            f"error_budget: the best choice found measures cosine {1 - measured:.5f} < min_cosine "
            f"{budget.min_cosine} on the sample inputs"
            + (f" within max_bytes_ratio={budget.max_bytes_ratio}" if budget.max_bytes_ratio is not None else "")
            + "; allow more bytes, lower min_cosine or add candidates (e.g. 'float')"
        )
        if on_violation != "warn":
            raise PassError(message + "; the network is untouched")
        logger.warning(message)
        notes.append(message)

    layers, new_matches, prebuilt, kept = [], [], {}, []
    chosen_bytes = 0
    for i, (m, k) in enumerate(zip(eligible, choice, strict=True)):
        opts = options[i]
        opt = opts[k]
        chosen_bytes += opt.nbytes
        layers.append(
            LayerChoice(
                m.candidate.path,
                opts[0].label,
                opt.label,
                {o.label: o.nbytes for o in opts},
                {o.label: o.sensitivity for o in opts},
                "" if i in idle else opts[0].label,
            )
        )
        if opt.layer is None:
            kept.append((m.candidate.path, "accuracy-aware: kept in float (most sensitive per byte)"))
            continue
        if k == 0:
            new_matches.append(m)
        else:
            rule = dataclasses.replace(m.rule, name=f"{m.rule.name}->{opt.label}", rewrite=dict(opt.rewrite))
            rule = dataclasses.replace(rule, _replacement=ruleset.replacement(opt.rewrite["to"]))
            new_matches.append(Match(rule, m.candidate))
        prebuilt[m.candidate.path] = opt.layer
    others = [m for m in matches if m not in eligible]
    plan = MixedPlan(
        budget,
        layers,
        1.0 - base_error,
        1.0 - predicted,
        1.0 - measured,
        base_bytes,
        chosen_bytes,
        rounds,
        runner.runs,
        notes,
    )
    if rounds > 1:
        notes.append(f"first prediction {1 - first_predicted:.5f} was repaired in {rounds - 1} round(s)")
    order = {id(m.candidate): n for n, m in enumerate(matches)}
    ordered = sorted(new_matches + others, key=lambda m: order[id(m.candidate)])
    return ordered, prebuilt, kept, plan
