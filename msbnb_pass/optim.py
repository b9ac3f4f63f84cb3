"""8-bit Adam / AdamW: bitsandbytes' block-wise dynamic quantization of the two moment states.

Per parameter with at least ``min_8bit_size`` elements (bitsandbytes' default 4096), both Adam moments are
stored as uint8 codes of bitsandbytes' dynamic 8-bit maps (``create_dynamic_map(signed=True)`` for the
first moment, ``signed=False`` for the second, which is never negative) with one float32 absmax per block
of 2048 elements: 2 bytes + 8/2048 bytes per element instead of fp32 Adam's 8 (25.05%). Each step
dequantizes the block's states, applies the float32 Adam update with them, and re-quantizes the new states
to the nearest code (block absmax recomputed). Smaller parameters keep float32 states (as bitsandbytes
does: their state is too small to matter and 8-bit would cost accuracy).

The update is written with MindSpore ops on Parameters (uint8 codes, float32 absmax), so the optimizer
runs inside an ``ms.jit`` / GRAPH_MODE train step like ``nn.Adam``.

**Paged optimizers** (bitsandbytes' ``PagedAdamW8bit``...) move optimizer state between GPU and CPU memory
with CUDA unified memory when the GPU runs short. On a CPU-only machine all state already lives in host
memory, so "paged" has no meaning here and no paged class is provided.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .errors import MsbnbError
from .formats.codebooks import create_dynamic_map

logger = logging.getLogger(__name__)

__all__ = ["Adam8bit", "AdamW8bit", "OptimizerError"]

BLOCKSIZE = 2048


class OptimizerError(MsbnbError):
    """An optimizer argument that cannot be used."""


def _number(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
    if ok:
        v = float(value)
        ok = np.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v < hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'})"
        raise OptimizerError(f"{name} must be a number in {rng}, got {value!r}")
    return float(value)


def _map_and_midpoints(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    code = np.sort(create_dynamic_map(signed=signed).astype(np.float32))
    mid = ((code[1:].astype(np.float64) + code[:-1]) / 2).astype(np.float32)
    return code, mid


def _zero_index(code: np.ndarray) -> int:
    return int(np.argmin(np.abs(code)))


class _Adam8bitBase(nn.Optimizer):
    _decoupled = True

    def __init__(
        self,
        params: Iterable[Parameter],
        learning_rate: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        block_size: int = BLOCKSIZE,
        min_8bit_size: int = 4096,
    ):
        params = list(params)
        if not params:
            raise OptimizerError(f"{type(self).__name__}: params is empty (no trainable parameters?)")
        if not all(isinstance(p, Parameter) for p in params):
            bad = next(p for p in params if not isinstance(p, Parameter))
            raise OptimizerError(
                f"{type(self).__name__}: params must be Parameters (e.g. net.trainable_params()); parameter "
                f"groups are not supported, got a {type(bad).__name__}"
            )
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise OptimizerError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _number("betas[0]", betas[0], 0.0, 1.0)
        b2 = _number("betas[1]", betas[1], 0.0, 1.0)
        eps = _number("eps", eps, 0.0, None, lo_open=True)
        wd = _number("weight_decay", weight_decay, 0.0)
        if isinstance(block_size, bool) or block_size not in (256, 512, 1024, 2048, 4096):
            raise OptimizerError(f"block_size = {block_size!r} is not accepted; accepted: [256, 512, 1024, 2048, 4096]")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise OptimizerError(f"min_8bit_size must be an integer >= 0, got {min_8bit_size!r}")
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
            _number("learning_rate", learning_rate, 0.0)
        super().__init__(learning_rate, params, weight_decay=0.0)
        self.beta1, self.beta2, self.eps, self.wd = b1, b2, eps, wd
        self.block_size = block_size
        code1, mid1 = _map_and_midpoints(True)
        code2, mid2 = _map_and_midpoints(False)
        self.code1, self.mid1 = Tensor(code1), Tensor(mid1)
        self.code2, self.mid2 = Tensor(code2), Tensor(mid2)
        z1, z2 = _zero_index(code1), _zero_index(code2)
        self.is8 = tuple(int(p.size) >= min_8bit_size for p in params)
        self.sizes = tuple(int(p.size) for p in params)
        self.nblocks = tuple(-(-int(p.size) // block_size) for p in params)
        self.pads = tuple(nb * block_size - n for nb, n in zip(self.nblocks, self.sizes, strict=True))
        s1, a1, s2, a2 = [], [], [], []
        for i, p in enumerate(params):
            base = p.name
            if self.is8[i]:
                n = self.nblocks[i] * block_size
                s1.append(Parameter(Tensor(np.full(n, z1, np.uint8)), name=f"{base}.state1", requires_grad=False))
                s2.append(Parameter(Tensor(np.full(n, z2, np.uint8)), name=f"{base}.state2", requires_grad=False))
                a1.append(Parameter(Tensor(np.zeros(self.nblocks[i], np.float32)), name=f"{base}.absmax1"))
                a2.append(Parameter(Tensor(np.zeros(self.nblocks[i], np.float32)), name=f"{base}.absmax2"))
            else:
                s1.append(Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"{base}.state1", requires_grad=False))
                s2.append(Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"{base}.state2", requires_grad=False))
                a1.append(Parameter(Tensor(np.zeros(1, np.float32)), name=f"{base}.absmax1"))
                a2.append(Parameter(Tensor(np.zeros(1, np.float32)), name=f"{base}.absmax2"))
            for q in (a1[-1], a2[-1]):
                q.requires_grad = False
        self.state1 = ParameterTuple(s1)
        self.state2 = ParameterTuple(s2)
        self.absmax1 = ParameterTuple(a1)
        self.absmax2 = ParameterTuple(a2)
        self.step_t = Parameter(Tensor(np.zeros(1, np.float32)), name="adam8bit_step", requires_grad=False)
        self.n_params = len(params)

    # ---- accounting -------------------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's moment states (codes, absmax, float32 states of small tensors)."""
        return int(sum(p.size * p.itemsize for t in (self.state1, self.state2, self.absmax1, self.absmax2) for p in t))

    def dequantized_states(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(first moment, second moment) of parameter ``i`` as float32 arrays of its shape."""
        p = self._parameters[i]
        if not self.is8[i]:
            return self.state1[i].asnumpy().copy(), self.state2[i].asnumpy().copy()
        out = []
        for codes, absmax, code in (
            (self.state1[i], self.absmax1[i], self.code1),
            (self.state2[i], self.absmax2[i], self.code2),
        ):
            vals = code.asnumpy()[codes.asnumpy().astype(np.int64)].reshape(-1, self.block_size)
            vals = vals * absmax.asnumpy()[:, None]
            out.append(vals.reshape(-1)[: self.sizes[i]].reshape(p.shape).astype(np.float32))
        return out[0], out[1]

    # ---- the step (graph-mode compatible) -------------------------------------------------------------------
    def construct(self, gradients):
        lr = self.get_lr()
        step = self.step_t + 1.0
        ops.assign(self.step_t, step)
        bc1 = 1.0 - ops.pow(self.beta1, step)
        bc2 = 1.0 - ops.pow(self.beta2, step)
        params = self._parameters
        for i in range(self.n_params):
            if self.is8[i]:
                self._update8(i, params[i], gradients[i], lr, bc1, bc2)
            else:
                self._update32(i, params[i], gradients[i], lr, bc1, bc2)
        return True

    def _grad(self, p, g):
        g = ops.cast(g, ms.float32)
        if not self._decoupled and self.wd > 0.0:
            g = g + self.wd * p
        return g

    def _apply(self, p, upd, lr):
        if self._decoupled and self.wd > 0.0:
            new_p = p * (1.0 - lr * self.wd) - lr * upd
        else:
            new_p = p - lr * upd
        ops.assign(p, ops.cast(new_p, p.dtype))

    def _update32(self, i, p, g, lr, bc1, bc2):
        g = self._grad(p, g)
        m = self.beta1 * self.state1[i] + (1.0 - self.beta1) * g
        v = self.beta2 * self.state2[i] + (1.0 - self.beta2) * g * g
        ops.assign(self.state1[i], m)
        ops.assign(self.state2[i], v)
        upd = (m / bc1) / (ops.sqrt(v / bc2) + self.eps)
        self._apply(p, upd, lr)

    def _update8(self, i, p, g, lr, bc1, bc2):
        bs = self.block_size
        nb = self.nblocks[i]
        n = self.sizes[i]
        g = self._grad(p, g).reshape(-1)
        if self.pads[i] > 0:
            g = ops.concat((g, ops.zeros(self.pads[i], ms.float32)))
        g = g.reshape(nb, bs)
        q1, q2 = self.state1[i], self.state2[i]
        a1, a2 = self.absmax1[i], self.absmax2[i]
        m = ops.gather(self.code1, ops.cast(q1, ms.int32), 0).reshape(nb, bs) * a1.reshape(nb, 1)
        v = ops.gather(self.code2, ops.cast(q2, ms.int32), 0).reshape(nb, bs) * a2.reshape(nb, 1)
        m = self.beta1 * m + (1.0 - self.beta1) * g
        v = self.beta2 * v + (1.0 - self.beta2) * g * g
        upd = (m / bc1) / (ops.sqrt(v / bc2) + self.eps)
        upd = upd.reshape(-1)[:n].reshape(p.shape)
        self._apply(p, upd, lr)
        am = ops.abs(m).max(axis=1)
        av = v.max(axis=1)
        nm = m / ops.maximum(am, 1e-30).reshape(nb, 1)
        nv = v / ops.maximum(av, 1e-30).reshape(nb, 1)
        c1 = ops.searchsorted(self.mid1, nm.reshape(-1), out_int32=True)
        c2 = ops.searchsorted(self.mid2, nv.reshape(-1), out_int32=True)
        ops.assign(q1, ops.cast(c1, ms.uint8))
        ops.assign(q2, ops.cast(c2, ms.uint8))
        ops.assign(a1, am)
        ops.assign(a2, av)


class AdamW8bit(_Adam8bitBase):
    """AdamW (decoupled weight decay: ``p <- p * (1 - lr * weight_decay) - lr * adam_update``) with 8-bit
    block-wise states. ``AdamW8bit(net.trainable_params(), learning_rate=1e-3, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=1e-2)`` (bitsandbytes' defaults). See the module docstring."""

    _decoupled = True

    def __init__(
        self,
        params: Iterable[Parameter],
        learning_rate: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **kwargs: Any,
    ):
        super().__init__(params, learning_rate, betas, eps, weight_decay, **kwargs)


class Adam8bit(_Adam8bitBase):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam) with 8-bit block-wise states."""

    _decoupled = False
