"""Calibrated rounding in the pass: ``apply(net, rules, calibration=samples)``.

The float network runs over the calibration samples (argument tuples for ``net(*args)``) while every
matched layer's input rows are folded into ``X^T X`` (the GPTQ Hessian, up to scale); each layer is then
quantized by :mod:`msbnb_pass.formats.gptq` with its format's own quantizer, and its cell is built from
the resulting arrays through the ordinary constructor, so the parameters, state dicts and checkpoints
are exactly those of a round-to-nearest cell (only the codes differ).

A rule chooses its rounding with ``rewrite.rounding``: ``"nearest"`` (bitsandbytes' round-to-nearest, the
default) or ``"gptq"`` (needs calibration samples). Passing ``calibration=`` turns every matched rule
that does not say ``rounding = "nearest"`` explicitly to ``"gptq"``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .errors import PassError
from .formats import gptq as _gptq
from .replacements import BUILTIN_REPLACEMENTS, LinearView

logger = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "gptq")
CALIBRATED_REPLACEMENTS = ("linear4bit", "linear8bit", "linear8bitlt")


@dataclass
class Calibration:
    """What the calibration run saw: per matched layer ``X^T X`` (float64) and the row count."""

    samples: int = 0
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    probes: dict[str, np.ndarray] = field(default_factory=dict)  # a few real input rows per layer (verification)
    seconds: float = 0.0  # running the network and summing X^T X
    quantize_seconds: float = 0.0  # GPTQ over all layers


# ---- the argument ----------------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    if isinstance(value, (Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]


def check_samples(net: nn.Cell, calibration: Any) -> list[tuple]:
    """The calibration samples as a list of argument tuples, or a PassError saying what is wrong."""
    if isinstance(calibration, (Tensor, np.ndarray, str, bytes)) or not isinstance(calibration, Iterable):
        raise PassError(
            f"calibration must be an iterable of argument tuples for net(*args), e.g. [(input_ids,), ...]; got "
            f"{_describe(calibration)}"
            + (" (wrap a single input as [(x,)])" if isinstance(calibration, (Tensor, np.ndarray)) else "")
        )
    samples = []
    for i, s in enumerate(calibration):
        args = tuple(s) if isinstance(s, (tuple, list)) else (s,)
        bad = next((a for a in args if not isinstance(a, (Tensor, np.ndarray, int, float, bool))), None)
        if not args or bad is not None:
            raise PassError(
                f"calibration sample {i} must be a tuple of the network's inputs (Tensors), got "
                f"{_describe(s) if not args else 'an argument that is ' + _describe(bad)}"
            )
        samples.append(tuple(Tensor(a) if isinstance(a, np.ndarray) else a for a in args))
    if not samples:
        raise PassError("calibration is empty: it needs at least one sample (an argument tuple for net(*args))")
    try:
        sig = inspect.signature(net.construct)
    except (TypeError, ValueError):  # pragma: no cover - construct without a signature
        sig = None
    for i, args in enumerate(samples):
        if sig is not None:
            try:
                sig.bind(*args)
            except TypeError as exc:
                params = ", ".join(sig.parameters)
                raise PassError(
                    f"calibration sample {i} has {len(args)} argument(s), but {type(net).__name__}.construct"
                    f"({params}) does not accept them: {exc}"
                ) from None
        if len(args) != len(samples[0]):
            raise PassError(
                f"calibration sample {i} has {len(args)} argument(s), sample 0 has {len(samples[0])}; every "
                "sample must be an argument tuple of the same arity"
            )
    return samples


def rounding_of(rule: Any, calibrated: bool) -> str:
    """The rounding a matched rule gets: its explicit ``rewrite.rounding``, else gptq when calibrating."""
    if rule.replacement.kind == "embedding":  # a lookup table has no input activations to calibrate on
        return "nearest"
    explicit = rule.rewrite.get("rounding")
    if explicit is not None:
        return explicit
    return "gptq" if calibrated else "nearest"


def check_rules(matches: list, calibrated: bool) -> None:
    """Refuse gptq rounding without samples, and calibration for a replacement that cannot use it."""
    for m in matches:
        rule = m.rule
        rounding = rounding_of(rule, calibrated)
        if rounding != "gptq":
            continue
        if not calibrated:
            raise PassError(
                f"{rule.origin('rounding')}: rewrite.rounding = 'gptq' needs calibration samples: "
                "apply(net, rules, calibration=[(x,), ...])"
            )
        repl = rule.replacement
        name = repl.name
        params = rule.replacement_params()
        if BUILTIN_REPLACEMENTS.get(name) is not repl:
            raise PassError(
                f"{rule.origin()}: replacement {name!r} cannot use calibration (calibrated rounding is built for "
                f"{list(CALIBRATED_REPLACEMENTS)}); quantize its layers in an apply() call without calibration"
            )
        if params.get("has_fp16_weights"):
            raise PassError(
                f"{rule.origin()}: has_fp16_weights = true keeps a float weight, so there are no codes to "
                "calibrate; set rewrite.rounding = 'nearest' on this rule or has_fp16_weights = false"
            )


# ---- recording the activations -----------------------------------------------------------------------------------
class _Recorder(nn.Cell):
    """Temporarily stands in for a matmul primitive to record its activation operand (PyNative)."""

    def __init__(self, prim, key, keep):
        super().__init__()
        self.prim = prim
        self._key = key
        self._keep = keep

    def construct(self, x, w):
        self._keep(self._key, x)
        return self.prim(x, w)


@contextlib.contextmanager
def recording(netgraph, matches: list, keep) -> Iterator[None]:
    """While inside, ``keep(anchor, x)`` sees the input of every matched layer when the network runs."""
    from .rewrite import Transaction

    handles = []
    undo = Transaction()
    try:
        for m in matches:
            cand = m.candidate
            if cand.kind == "embedding":  # its input is token ids, not activations
                continue
            if cand.level == "cell":
                cell = netgraph.obj(cand.anchor)
                handles.append(cell.register_forward_pre_hook(lambda c, args, key=cand.anchor: keep(key, args[0])))
            else:
                owner = netgraph.obj(cand.owner)
                undo.set_attr(owner, cand.prim_attr, _Recorder(getattr(owner, cand.prim_attr), cand.anchor, keep))
        yield
    finally:
        for h in handles:
            h.remove()
        undo.rollback()


class _Stop(Exception):
    """Raised by the recorder once a sample has reached every matched layer: the rest is not needed."""


def collect(
    netgraph, net: nn.Cell, matches: list, samples: list[tuple], probe_rows: int = 32, compiled: bool = True
) -> Calibration:
    """Run the float network over ``samples``, summing ``X^T X`` of each matched layer's input rows.

    By default the network runs compiled (``mindspore.jit``) with every matched layer wrapped so that its
    input's ``X^T X`` is accumulated into a float32 Parameter inside the graph: an order of magnitude faster
    than running op by op (SmolLM2-135M: ~0.6 s per 256-token sample compiled against ~6 s in PyNative).
    Layers whose sums come out bit-identical (q/k/v, gate/up: the same input tensor) then share one
    Hessian. A network that cannot be compiled falls back to the op-by-op recording below (logged).

    The op-by-op recording (``compiled=False``) folds each call's rows into float64 sums through hooks;
    layers that read the same input tensor share one sum, computed once per call (the sharing seen on the
    first sample is checked on every call; if a later sample breaks it, the run is repeated with one sum
    per layer). After the first sample, a sample stops as soon as it has reached the last matched layer.
    """
    import time

    t0 = time.perf_counter()
    cal = None
    if compiled:
        try:
            cal = _collect_compiled(netgraph, net, matches, samples, probe_rows)
        except Exception as exc:  # a construct MindSpore cannot compile, or a sample it rejects
            logger.info(
                "calibration: the network did not run compiled (%s: %s); recording op by op instead",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
    if cal is None:
        cal = _collect(netgraph, net, matches, samples, probe_rows, share=True)
    if cal is None:
        logger.info("calibration: layers share inputs differently across samples; recording one sum per layer")
        cal = _collect(netgraph, net, matches, samples, probe_rows, share=False)
    cal.seconds = time.perf_counter() - t0
    return cal


class _GramAccumulator(nn.Cell):
    """Adds ``X^T X`` of its input rows to a float32 Parameter and keeps the first ``probe_rows`` rows of
    the latest call, inside a compiled graph. Each side effect costs compile and run time, so there are two:
    the rows get a column of ones, which makes the row count the sum's last diagonal element (exact below
    2^24 rows) and marks the valid rows of a probe padded with zeros."""

    def __init__(self, in_features: int, probe_rows: int, name: str):
        from mindspore import Parameter

        super().__init__()
        self.in_features = in_features
        self.probe_rows = probe_rows
        k1 = in_features + 1
        # unique names: a compiled graph refuses two Parameters of one name
        self.gram = Parameter(Tensor(np.zeros((k1, k1), np.float32)), f"{name}.gram", False)
        # probe_rows = 0: no probe (the pass has its own, or does not verify): one side effect fewer to compile
        self.probe = Parameter(Tensor(np.zeros((max(probe_rows, 1), k1), np.float32)), f"{name}.probe", False)
        self.gram_product = ops.MatMul(transpose_a=True)

    def construct(self, x):
        rows = ops.cast(x.reshape(-1, self.in_features), ms.float32)
        n = rows.shape[0]
        rows = ops.cat((rows, ops.ones((n, 1), ms.float32)), 1)
        ops.assign_add(self.gram, self.gram_product(rows, rows))
        if self.probe_rows == 0:
            return x
        if n >= self.probe_rows:
            ops.assign(self.probe, rows[: self.probe_rows])
        else:
            ops.assign(self.probe, ops.cat((rows, ops.zeros((self.probe_rows - n, self.in_features + 1), ms.float32))))
        return x

    def results(self) -> tuple[np.ndarray, int, np.ndarray]:
        """(``X^T X`` float32, the row count, the probe rows)."""
        gram = self.gram.asnumpy()
        k = self.in_features
        probe = self.probe.asnumpy()[: self.probe_rows]
        return gram[:k, :k], int(round(float(gram[k, k]))), probe[probe[:, k] == 1.0, :k].copy()


class _RecordingLayer(nn.Cell):
    """A matched Linear-like cell with its input recorded first."""

    def __init__(self, inner: nn.Cell, record: _GramAccumulator):
        super().__init__(auto_prefix=False)  # the recorder's Parameters keep their unique names
        self.inner = inner
        self.record = record

    def construct(self, x, *args):
        return self.inner(self.record(x), *args)


class _RecordingMatmul(nn.Cell):
    """A matched matmul primitive with its activation operand recorded first."""

    def __init__(self, prim, record: _GramAccumulator):
        super().__init__(auto_prefix=False)  # the recorder's Parameters keep their unique names
        self.prim = prim
        self.record = record

    def construct(self, x, w):
        return self.prim(self.record(x), w)


class _Runner(nn.Cell):
    """Runs ``net`` compiled. A network compiled earlier keeps its graph (keyed by the Cell and its
    creation time, not by its children), so the recorders need a Cell of their own to be compiled in."""

    def __init__(self, net: nn.Cell):
        super().__init__(auto_prefix=False)  # the network's parameter names stay as they are
        self.net = net
        self._run = ms.jit(self.construct)

    def construct(self, *args):
        return self.net(*args)

    def __call__(self, *args):
        return self._run(*args)


def _swap_child(parent: nn.Cell, attr: str, new: nn.Cell) -> Callable[[], None]:
    """Put ``new`` in ``parent``'s child slot (or primitive attribute) ``attr`` without renaming any
    Parameter (``Cell.__setattr__`` would prefix every parameter below it); returns the undo."""
    cells = parent._cells
    if attr in cells:
        old = cells[attr]
        cells[attr] = new
        return lambda: cells.__setitem__(attr, old)
    prim = parent.__dict__.pop(attr)  # a primitive attribute: the child slot shadows nothing now
    cells[attr] = new

    def undo() -> None:
        del cells[attr]
        parent.__dict__[attr] = prim

    return undo


def _collect_compiled(netgraph, net, matches, samples, probe_rows) -> Calibration:
    from .rewrite import _cell_at

    records: dict[str, _GramAccumulator] = {}
    undo: list[Callable[[], None]] = []
    try:
        for i, m in enumerate(matches):
            cand = m.candidate
            rec = records[cand.anchor] = _GramAccumulator(int(cand.in_features), probe_rows, f"msbnb_calibration_{i}")
            if cand.level == "cell":
                cell = netgraph.obj(cand.anchor)
                for path in netgraph.node(cand.anchor)["paths"]:
                    if not path:
                        raise PassError("the network itself is a matched layer")  # recorded op by op instead
                    parent_path, _, attr = path.rpartition(".")
                    undo.append(_swap_child(_cell_at(net, parent_path), attr, _RecordingLayer(cell, rec)))
            else:
                owner = netgraph.obj(cand.owner)
                undo.append(_swap_child(owner, cand.prim_attr, _RecordingMatmul(getattr(owner, cand.prim_attr), rec)))
        runner = _Runner(net)  # a fresh Cell: MindSpore keys compiled graphs by the Cell, not its children
        for args in samples:
            runner(*args)
        del runner  # its compiled graph (which holds the recorders) goes with it
        cal = Calibration(samples=len(samples))
        by_digest: dict[bytes, list[tuple[np.ndarray, str]]] = {}
        for key, rec in records.items():
            gram, rows, probe = rec.results()
            if rows == 0:
                continue  # never ran: the pass reports it
            digest = (gram.shape[0], float(gram.trace()), float(gram[0].sum()))
            same = next((h for h, g in by_digest.get(digest, []) if np.array_equal(g, gram)), None)
            if same is None:  # the first layer with this sum owns it; identical sums (same input) share it
                same = gram.astype(np.float64)
                by_digest.setdefault(digest, []).append((same, gram))
            cal.hessians[key] = same
            cal.rows[key] = rows
            cal.probes[key] = probe
        return cal
    finally:
        for fn in reversed(undo):
            fn()


def _collect(netgraph, net, matches, samples, probe_rows, share: bool) -> Calibration | None:
    cal = Calibration(samples=len(samples))
    root: dict[str, str] = {}  # layer -> the layer whose sum it shares (itself when it owns one)
    state = {"x": None, "xtx": None, "rows": None, "key": None, "calls": [], "first": [], "ok": True, "n": 0}

    def keep(key: str, x) -> None:
        same = x is state["x"]
        if not same:
            arr = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
            rows = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]), dtype=np.float32)
            state.update(x=x, rows=rows, xtx=np.dot(rows.T, rows))  # np.dot runs X^T X as a rank-k update
        rows = state["rows"]
        if key not in root:  # first call of this layer: does it share the previous layer's input?
            root[key] = root[state["key"]] if (share and same and state["key"] is not None) else key
            if root[key] == key:
                cal.hessians[key] = np.zeros((rows.shape[1], rows.shape[1]), np.float64)
            else:
                cal.hessians[key] = cal.hessians[root[key]]
            cal.probes[key] = rows[:probe_rows].copy()
        elif root[key] != key and not (same and root[state["key"]] == root[key]):
            state["ok"] = False  # the sharing seen on the first sample does not hold here
        if root[key] == key:
            cal.hessians[key] += state["xtx"]
        cal.rows[key] = cal.rows.get(key, 0) + rows.shape[0]
        state["key"] = key
        calls = state["calls"]
        calls.append(key)
        first = state["first"]
        if state["n"] > 0 and len(calls) == len(first) and calls == first:
            raise _Stop  # this sample has reached every matched layer the first one did

    with recording(netgraph, matches, keep):
        for i, args in enumerate(samples):
            state.update(x=None, xtx=None, rows=None, key=None, calls=[], n=i)
            try:
                net(*args)
            except _Stop:
                pass
            except Exception as exc:
                if not isinstance(exc.__cause__ or exc.__context__, _Stop):  # the stop, wrapped by MindSpore
                    raise PassError(
                        f"calibration sample {i}: running the network on it failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the network is untouched"
                    ) from exc
            if i == 0:
                state["first"] = list(state["calls"])
            if not state["ok"]:
                return None
    state.update(x=None, xtx=None, rows=None)
    return cal


# ---- quantizing one layer -----------------------------------------------------------------------------------------
def quantizer_for(name: str, params: dict, weight: np.ndarray):
    """The GPTQ quantizer of a built-in replacement's format."""
    if name == "linear4bit":
        return _gptq.Blockwise4bitQuantizer(
            weight,
            params["quant_type"],
            params["blocksize"],
            params["double_quant"],
            params["symmetric"],
            static_groups=True,  # scales from the original weight, columns by decreasing Hessian diagonal
        )
    if name == "linear8bitlt":
        return _gptq.Int8Quantizer(weight, "llm_int8")
    if name == "linear8bit":
        return _gptq.Int8Quantizer(weight, "int8", params["symmetric"], params["per_channel"])
    raise PassError(f"replacement {name!r} has no calibrated rounding")  # pragma: no cover - check_rules refuses it


class FactorCache:
    """GPTQ's per-Hessian work (:func:`formats.gptq.prepare`), done once for the layers that share a Hessian
    (q/k/v, gate/up) and dropped when the last of them is quantized."""

    def __init__(self, hessians: list[np.ndarray]):
        self._users: dict[int, int] = {}
        for h in hessians:
            self._users[id(h)] = self._users.get(id(h), 0) + 1
        self._prepared: dict[tuple[int, bool], _gptq.Prepared] = {}

    def get(self, hessian: np.ndarray, act_order: bool) -> _gptq.Prepared:
        key = (id(hessian), act_order)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _gptq.prepare(hessian, act_order)
        left = self._users.get(id(hessian), 1) - 1
        self._users[id(hessian)] = left
        if left <= 0:
            for k in [k for k in self._prepared if k[0] == id(hessian)]:
                del self._prepared[k]
        return prepared


def build_calibrated(
    view: LinearView, hessian: np.ndarray, name: str, params: dict, cache: FactorCache | None = None
) -> tuple[nn.Cell, _gptq.GPTQResult]:
    """The quantized cell of ``view`` with GPTQ-chosen codes, built by the cell's ordinary constructor."""
    from .nn import Linear4bit, Linear8bit, Linear8bitLt

    quantizer = quantizer_for(name, params, view.weight)
    act_order = quantizer.column_free
    prepared = None if cache is None else cache.get(hessian, act_order)
    from .kernels import _lib

    kernel = _lib.gptq_batch if _lib.available() else None
    result = _gptq.gptq_quantize(
        view.weight, hessian, quantizer, act_order=act_order, prepared=prepared, batch_kernel=kernel
    )
    a = result.arrays
    out_f, in_f = view.weight.shape
    has_bias = view.bias is not None
    layer_name = view.path or None
    if name == "linear4bit":
        layer = Linear4bit(
            in_f,
            out_f,
            has_bias,
            params["quant_type"],
            params["blocksize"],
            params["double_quant"],
            params["compute_dtype"],
            symmetric=params["symmetric"],
            quant_state=a["quant_state"],
            packed=a["packed"],
            bias_value=view.bias,
            backend=params["backend"],
            layer_name=layer_name,
        )
    elif name == "linear8bitlt":
        layer = Linear8bitLt(
            in_f,
            out_f,
            has_bias,
            False,
            params["threshold"],
            CB=a["CB"],
            SCB=a["SCB"],
            bias_value=view.bias,
            backend=params["backend"],
            layer_name=layer_name,
        )
    else:
        layer = Linear8bit(
            in_f,
            out_f,
            has_bias,
            True,
            params["symmetric"],
            params["per_channel"],
            weight=view.weight,
            bias_value=view.bias,
            compute_dtype=params["compute_dtype"],
            backend=params["backend"],
            layer_name=layer_name,
        )
        layer._set_quantized(a["q"], a["scale"], a["offset"])
    layer._set_activation(view.activation)
    return layer, result
