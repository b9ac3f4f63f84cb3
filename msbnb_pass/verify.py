"""Numerical-equivalence checks: each quantized layer against its float original and its kernel against
the reference computation, and whole networks against each other. The report is a value (table + JSON).

Default bounds per scheme, on probe inputs (relative RMS error ``||y_q - y|| / ||y||`` and cosine):
derived from bitsandbytes' own test bounds for N(0, 1) weights — mean absolute error per element
NF4 0.0733, FP4 0.0973 at blocksize 64 — which for Gaussian weights are a relative RMS weight error of
about 0.092 (NF4) and 0.122 (FP4); a random input carries that into the output. The defaults add ~40%
for real (heavier-tailed) weights. INT4 (absmax/7) and INT8 follow from their step sizes the same way;
LLM.int8() adds the int8 rounding of the activations. The kernel is held to fp32 rounding: Higham's bound
``(K+2) u / (1 - (K+2) u) * sum |x||w|`` (u = 2^-24) against the float64 product with the dequantized
weights, on a sample of output rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

U = 2.0**-24


@dataclass(frozen=True)
class Bound:
    max_rel_error: float
    min_cosine: float


DEFAULT_BOUNDS: dict[str, Bound] = {
    "nf4": Bound(0.13, 0.990),
    "fp4": Bound(0.17, 0.985),
    "int4": Bound(0.22, 0.975),
    "int4_asym": Bound(0.16, 0.985),
    "int8": Bound(0.012, 0.9999),
    "int8_asym": Bound(0.012, 0.9999),
    "llm_int8": Bound(0.03, 0.9995),
}
VIOLATION_ACTIONS = ("raise", "keep_float", "warn")


def metrics(reference: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """max/mean absolute error, relative (RMS) error, cosine similarity and SQNR (dB) in float64."""
    ref = np.asarray(reference, np.float64).ravel()
    app = np.asarray(approx, np.float64).ravel()
    if ref.shape != app.shape:
        raise ValueError(f"metrics: shapes differ, {np.shape(reference)} vs {np.shape(approx)}")
    err = app - ref
    signal, noise = float(ref @ ref), float(err @ err)
    denom = math.sqrt(signal * float(app @ app))
    return {
        "max_abs_error": float(np.abs(err).max()) if err.size else 0.0,
        "mean_abs_error": float(np.abs(err).mean()) if err.size else 0.0,
        "relative_error": math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf),
        "cosine": float(ref @ app / denom) if denom > 0 else (1.0 if noise == 0 else 0.0),
        "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf,
    }


@dataclass
class LayerCheck:
    """One rewritten layer's verification."""

    path: str
    scheme: str
    probe: str  # "captured" or "synthetic"
    metrics: dict[str, float]
    bound: Bound
    kernel_ok: bool  # the kernel equals the reference computation within fp32 rounding
    kernel_worst_ratio: float  # max |error| / fp32 bound (<= 1 passes)
    action: str = "quantized"  # "quantized", "kept_float", "quantized (violation)"

    @property
    def passed(self) -> bool:
        return (
            self.metrics["relative_error"] <= self.bound.max_rel_error
            and self.metrics["cosine"] >= self.bound.min_cosine
            and self.kernel_ok
        )

    def failure(self) -> str:
        parts = []
        if self.metrics["relative_error"] > self.bound.max_rel_error:
            parts.append(f"relative error {self.metrics['relative_error']:.4g} > {self.bound.max_rel_error}")
        if self.metrics["cosine"] < self.bound.min_cosine:
            parts.append(f"cosine {self.metrics['cosine']:.6f} < {self.bound.min_cosine}")
        if not self.kernel_ok:
            parts.append(f"kernel differs from the reference by {self.kernel_worst_ratio:.3g}x the fp32 bound")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass
class Report:
    """Per-layer checks and, when sample inputs were given, the end-to-end comparison."""

    layers: list[LayerCheck] = field(default_factory=list)
    end_to_end: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed or c.action == "kept_float" for c in self.layers)

    @property
    def violations(self) -> list[LayerCheck]:
        return [c for c in self.layers if not c.passed]

    def table(self) -> str:
        head = f"{'layer':<40} {'scheme':<9} {'rel.err':>8} {'cosine':>9} {'SQNR dB':>8} {'kernel':>7}  action"
        lines = [head, "-" * len(head)]
        for c in self.layers:
            m = c.metrics
            mark = "ok" if c.kernel_ok else "FAIL"
            flag = "" if c.passed else "  << " + c.failure()
            lines.append(
                f"{(c.path or '<root>')[:40]:<40} {c.scheme:<9} {m['relative_error']:>8.4f} {m['cosine']:>9.6f} "
                f"{m['sqnr_db']:>8.2f} {mark:>7}  {c.action}{flag}"
            )
        if self.end_to_end:
            m = self.end_to_end
            lines.append(
                f"end to end: relative error {m['relative_error']:.4f}, cosine {m['cosine']:.6f}, "
                f"SQNR {m['sqnr_db']:.2f} dB over {m['outputs']} output(s)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "layers": [c.to_dict() for c in self.layers], "end_to_end": self.end_to_end}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_json_default)


def _json_default(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(type(obj).__name__)


def bound_for(scheme: str, bounds: dict[str, Bound] | None = None) -> Bound:
    if bounds and scheme in bounds:
        return bounds[scheme]
    return DEFAULT_BOUNDS.get(scheme, Bound(0.25, 0.97))


def fp32_worst_ratio(x: np.ndarray, w: np.ndarray, y: np.ndarray, bias: np.ndarray | None = None) -> float:
    """max over outputs of |y - (x @ w.T + b)| / Higham's fp32 bound; <= 1 means within fp32 rounding."""
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w64 = np.asarray(w, np.float64)
    ref = x2 @ w64.T
    mag = np.abs(x2) @ np.abs(w64).T
    if bias is not None:
        ref = ref + bias
        mag = mag + np.abs(bias)
    K = x2.shape[1]
    gamma = (K + 3) * U / (1 - (K + 3) * U)
    bound = gamma * mag + 1e-30
    return float((np.abs(np.asarray(y, np.float64).reshape(ref.shape) - ref) / bound).max()) if ref.size else 0.0


def _outputs(value) -> list[np.ndarray]:
    if isinstance(value, (tuple, list)):
        out = []
        for v in value:
            out.extend(_outputs(v))
        return out
    if hasattr(value, "asnumpy"):
        return [value.asnumpy()]
    return [np.asarray(value)]


def compare_outputs(before, after) -> dict[str, Any]:
    """End-to-end metrics of two networks' outputs (all output tensors flattened together)."""
    a, b = _outputs(before), _outputs(after)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise ValueError(f"the networks' outputs differ in structure: {[x.shape for x in a]} vs {[y.shape for y in b]}")
    ref = np.concatenate([x.astype(np.float64).ravel() for x in a]) if a else np.zeros(0)
    app = np.concatenate([y.astype(np.float64).ravel() for y in b]) if b else np.zeros(0)
    out = metrics(ref, app)
    out["outputs"] = len(a)
    return out


def verify(original, rewritten, inputs, *, min_cosine: float | None = None) -> dict[str, Any]:
    """Run two whole networks on the same inputs and compare their outputs (float64 metrics).

    ``inputs`` is a Tensor or a tuple of Tensors. With ``min_cosine`` the call raises AssertionError when
    the outputs' cosine similarity is below it.
    """
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    result = compare_outputs(original(*args), rewritten(*args))
    if min_cosine is not None and not result["cosine"] >= min_cosine:
        raise AssertionError(
            f"verify: cosine {result['cosine']:.6f} < {min_cosine} (relative error {result['relative_error']:.4g})"
        )
    return result


class _CallableModule(type(__import__("sys"))):
    """``msbnb_pass.verify`` is both this module and, called, the function ``verify``: importing the
    submodule rebinds the package attribute to the module, so the module itself must be callable."""

    def __call__(self, *args, **kwargs):
        return verify(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
