"""Applying matches to the Cell tree, transactionally.

Two kinds of edit, neither of which regenerates source code:

* cell level: the Linear-like cell is swapped in the tree for its quantized replacement at every path it
  is reachable at (``setattr``, or item assignment in SequentialCell / CellList / CellDict);
* call level: the primitive attribute used by ``self.<mm>(x, self.<w>)`` becomes a ``QuantizedMatmul``
  cell bound to the packed weight (``construct(x, _unused)``), the weight attribute a one-element
  placeholder Parameter; with a fused bias the bias-add primitive becomes a pass-through.

Every edit is recorded with its inverse in a ``Transaction``; any failure rolls all of them back, so the
network is exactly as before. After a successful pass every parameter is renamed to its tree path (unique
and stable: what checkpoints and GRAPH_MODE need), and the replaced float cells are dropped, so their
memory is released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mindspore import Parameter, Tensor, nn

from .errors import RewriteError
from .formats._checks import check_finite
from .graph import NetGraph
from .match import Candidate, Match
from .replacements import EmbeddingView, LinearView

logger = logging.getLogger(__name__)

__all__ = ["BiasPassthrough", "QuantizedMatmul", "RewriteError", "Transaction", "apply_match", "linear_view"]


class QuantizedMatmul(nn.Cell):
    """Stands in for a MatMul primitive attribute: ``construct(x, _unused)`` = the quantized layer of x.

    The second argument is the placeholder left where the float weight was; it is ignored.
    """

    def __init__(self, linear: nn.Cell):
        super().__init__()
        self.linear = linear

    def construct(self, x, unused):
        return self.linear(x)


class BiasPassthrough(nn.Cell):
    """Stands in for a bias-add primitive whose bias was fused into the preceding quantized matmul."""

    def construct(self, y, unused):
        return y


def placeholder_like(param: Parameter) -> Parameter:
    """A one-element, frozen Parameter of the same dtype, left where a moved weight was."""
    return Parameter(Tensor(np.zeros(1, dtype=_np_dtype(param))), name=param.name, requires_grad=False)


def _np_dtype(param: Parameter):
    import mindspore as ms

    return {ms.float16: np.float16, ms.float32: np.float32, ms.float64: np.float64}.get(param.dtype, np.float32)


# ---- transactions -----------------------------------------------------------------------------------------------
@dataclass
class Transaction:
    """Edits to a network with their inverses; ``rollback`` undoes them in reverse order."""

    undo: list[Callable[[], None]] = field(default_factory=list)

    def set_child(self, parent: nn.Cell, attr: str, new: Any) -> None:
        old = _get_child(parent, attr)
        _set_child(parent, attr, new)
        self.undo.append(lambda: _set_child(parent, attr, old))

    def set_attr(self, obj: nn.Cell, attr: str, new: Any) -> None:
        old = getattr(obj, attr)
        _replace_attr(obj, attr, new)
        self.undo.append(lambda: _replace_attr(obj, attr, old))

    def rename(self, param: Parameter, name: str) -> None:
        old = param.name
        param.name = name
        self.undo.append(lambda: setattr(param, "name", old))

    def call(self, undo: Callable[[], None]) -> None:
        self.undo.append(undo)

    def rollback(self) -> None:
        errors = []
        while self.undo:
            fn = self.undo.pop()
            try:
                fn()
            except Exception as exc:  # keep undoing: a partial restore is worse
                errors.append(exc)
        if errors:
            logger.error("rollback: %d undo step(s) failed: %s", len(errors), errors[0])

    def commit(self) -> None:
        self.undo.clear()


def forget_compiled_graphs(net: nn.Cell) -> None:
    """Make MindSpore compile ``net`` (and every cell in it) afresh on its next call.

    MindSpore keys a compiled graph by the Cell and its creation time, not by its children: a network run
    in GRAPH_MODE (or through ``jit``) before its layers were swapped would keep running its old graph,
    with the old layers and their weights alive. Every cell gets a new creation time, and the graphs
    compiled so far are released."""
    from mindspore.graph.api import _cell_graph_executor

    stamp = time.time_ns()
    for i, (_, cell) in enumerate(net.cells_and_names()):
        phases = getattr(cell, "_compile_cache", None)
        if phases:
            try:
                _cell_graph_executor.del_net_res(cell, set(phases))
            except Exception as exc:  # pragma: no cover - the new creation time alone forces a recompile
                logger.debug("releasing the compiled graphs of %s failed: %s", type(cell).__name__, exc)
            phases.clear()
        object.__setattr__(cell, "_create_time", stamp + i)


def _get_child(parent: nn.Cell, attr: str):
    return parent._cells[attr]


def _set_child(parent: nn.Cell, attr: str, new: nn.Cell) -> None:
    if isinstance(parent, (nn.SequentialCell, nn.CellList)) and attr.isdigit():
        parent[int(attr)] = new
    elif isinstance(parent, nn.CellDict):
        parent[attr] = new
    else:
        setattr(parent, attr, new)


def _replace_attr(obj: nn.Cell, attr: str, new: Any) -> None:
    """Set an attribute that may change category (primitive <-> cell, parameter <-> parameter)."""
    old = getattr(obj, attr, None)
    if isinstance(old, nn.Cell) and not isinstance(new, nn.Cell):
        del obj._cells[attr]
    elif not isinstance(old, (nn.Cell, Parameter)) and isinstance(new, nn.Cell) and attr in obj.__dict__:
        del obj.__dict__[attr]
    if isinstance(old, Parameter) and isinstance(new, Parameter):
        obj._params[attr] = new
        return
    setattr(obj, attr, new)


# ---- views of the float layer ----------------------------------------------------------------------------------
def linear_view(netgraph: NetGraph, cand: Candidate) -> LinearView | EmbeddingView:
    """The float layer a candidate rewrites, as ``y = activation(x @ W.T + b)`` (a lookup table: its
    ``[num, dim]`` table as an EmbeddingView)."""
    w = netgraph.obj(cand.weight).asnumpy()
    if w.dtype.kind == "f":  # NaN/Inf, or float64 values beyond float32: name the layer, index and value
        check_finite(w, f"{cand.path or '<root>'}: weight '{netgraph.node(cand.weight)['path']}'")
    if cand.kind == "embedding":
        return EmbeddingView(cand.path, np.ascontiguousarray(w, dtype=np.float32))
    weight = np.ascontiguousarray(w.T if cand.layout == "in_out" else w, dtype=np.float32)
    bias = netgraph.obj(cand.bias).asnumpy().astype(np.float32) if cand.bias else None
    activation = None
    if cand.level == "cell":
        cell = netgraph.obj(cand.anchor)
        spec = cand.spec
        if spec.bias and getattr(cell, "has_bias", True) is False:
            bias = None
        if spec.activation and (spec.activation_flag is None or getattr(cell, spec.activation_flag, False)):
            activation = getattr(cell, spec.activation, None)
    return LinearView(cand.path, weight, bias, activation)


# ---- applying one match ------------------------------------------------------------------------------------------
def apply_match(txn: Transaction, netgraph: NetGraph, net: nn.Cell, match: Match, new_layer: nn.Cell) -> None:
    """Put ``new_layer`` (the quantized replacement) in place of the match's float layer."""
    cand = match.candidate
    if cand.level == "cell":
        node = netgraph.node(cand.anchor)
        for path in node["paths"]:
            parent_path, _, attr = path.rpartition(".")
            parent = net if not path or "." not in path else _cell_at(net, parent_path)
            if not path:
                raise RewriteError("the network itself is a Linear-like cell; wrap it in a Cell to rewrite it")
            txn.set_child(parent, attr, new_layer)
        return
    owner = netgraph.obj(cand.owner)
    txn.set_attr(owner, cand.prim_attr, QuantizedMatmul(new_layer))
    if not cand.shared:  # the float weight has no other use: leave a placeholder so its memory goes
        if cand.weight_attr is None or "." in cand.weight_attr:
            raise RewriteError(f"{cand.path}: the weight is not a direct attribute of {cand.owner or '<root>'}")
        txn.set_attr(owner, cand.weight_attr, placeholder_like(getattr(owner, cand.weight_attr)))
    if cand.bias is not None and cand.bias_attr:
        txn.set_attr(owner, cand.bias_attr, BiasPassthrough())
        txn.set_attr(owner, cand.bias_param_attr, placeholder_like(getattr(owner, cand.bias_param_attr)))


def _cell_at(net: nn.Cell, path: str) -> nn.Cell:
    cell = net
    for part in path.split(".") if path else []:
        cell = cell._cells[part]
    return cell


def rename_parameters(txn: Transaction, net: nn.Cell) -> int:
    """Name every parameter after its (first) tree path; returns how many names changed."""
    changed = 0
    for name, param in net.parameters_and_names():
        if param.name != name:
            txn.rename(param, name)
            changed += 1
    return changed
