"""Building blocks shared by the models, and the hook through which a loader supplies their weights.

A model asks a :class:`WeightSource` for every parameter by its transformers name (``model.norm.weight``)
and for every linear layer (``model.layers.0.mlp.up_proj``). The default source initialises randomly; a
checkpoint loader answers with the stored arrays, or with an already-quantized cell, so a loaded network
never holds a float copy of a layer that is stored quantized. The models themselves know nothing of
quantization: a linear layer is whatever ``WeightSource.dense`` returns, ``nn.Dense`` by default.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer


class WeightSource:
    """Random initialisation (normal(0, ``std``) weights, zero biases, unit norms). Subclass to load."""

    def __init__(self, std: float = 0.02, seed: int = 0):
        self.std = float(std)
        self._rng = np.random.default_rng(seed)

    def array(self, name: str, shape: tuple[int, ...], init: str) -> np.ndarray:
        """The float32 value of parameter ``name``; ``init`` is 'normal', 'zeros' or 'ones'."""
        if init == "ones":
            return np.ones(shape, np.float32)
        if init == "zeros":
            return np.zeros(shape, np.float32)
        return (self._rng.standard_normal(shape, dtype=np.float32) * np.float32(self.std)).astype(np.float32)

    def table(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The value of a lookup table (an embedding): float32, or float16 where the source stores it so
        (rows are widened after the lookup, so the table need not be)."""
        return self.array(name, shape, "normal")

    def dense(self, name: str, in_features: int, out_features: int, has_bias: bool) -> nn.Cell:
        """The linear layer ``name`` (weight ``[out, in]``): an ``nn.Dense`` by default."""
        dense = nn.Dense(in_features, out_features, weight_init="zeros", bias_init="zeros", has_bias=has_bias)
        adopt(dense.weight, self.array(f"{name}.weight", (out_features, in_features), "normal"))
        if has_bias:
            adopt(dense.bias, self.array(f"{name}.bias", (out_features,), "zeros"))
        return dense

    def embedding(self, name: str, num: int, dim: int, half_ok: bool = True) -> nn.Cell:
        """The lookup table ``name`` (``[num, dim]``): an :class:`Embedding` by default."""
        return Embedding(self, name, num, dim, half_ok)

    def parameter(self, name: str, shape: tuple[int, ...], init: str, table: bool = False) -> Parameter:
        value = self.table(name, shape) if table else self.array(name, shape, init)
        param = Parameter(initializer("zeros", value.shape, ms.float16 if value.dtype == np.float16 else ms.float32))
        param.name = name.rsplit(".", 1)[-1]
        return adopt(param, value)


def adopt(param: Parameter, value: np.ndarray) -> Parameter:
    """Give a not yet initialised ``param`` the buffer of ``value`` (no copy: MindSpore adopts the numpy
    memory, so loading a tensor never holds it twice). ``value`` must be a fresh array nobody else writes."""
    value = np.ascontiguousarray(value)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{param.name}: value of shape {value.shape} for a parameter of shape {tuple(param.shape)}")
    param.set_data(Tensor.from_numpy(value))
    return param


def name_parameters(net: nn.Cell) -> None:
    """Name every parameter after its path in the cell tree (= its transformers state-dict key)."""
    for path, param in net.parameters_and_names():
        param.name = path


class Embedding(nn.Cell):
    """A lookup table with the parameter named ``weight`` (as in transformers), ``[num, dim]``.

    With ``half_ok`` the table may be held in float16 (when the checkpoint stores it so): the looked-up rows
    are widened to float32, exactly. A table that is also a matmul operand (a tied head) stays float32."""

    def __init__(self, source: WeightSource, name: str, num: int, dim: int, half_ok: bool = True):
        super().__init__()
        self.weight = source.parameter(f"{name}.weight", (num, dim), "normal", table=half_ok)

    def construct(self, ids):
        return ops.cast(ops.gather(self.weight, ids, 0), ms.float32)


class RMSNorm(nn.Cell):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (float32)."""

    def __init__(self, source: WeightSource, name: str, dim: int, eps: float):
        super().__init__()
        self.weight = source.parameter(f"{name}.weight", (dim,), "ones")
        self.eps = float(eps)

    def construct(self, x):
        # explicit broadcast_to + same-shape multiplies: MindSpore's CPU kernels for a broadcasting
        # binary op keep two size_t index arrays of the output's size for the life of the graph
        # (16 bytes per element, measured); a BroadcastTo output is an ordinary, reused temporary
        var = ops.mean(x * x, -1, keep_dims=True)
        inv = ops.broadcast_to(ops.rsqrt(var + self.eps), x.shape)
        return x * inv * ops.broadcast_to(self.weight, x.shape)


class Softmax(nn.Cell):
    """``ops.softmax`` over the last axis with a backward written in same-shape ops:
    ``dx = y * (dy - sum(dy * y))`` with the row sums spread by ``broadcast_to``. MindSpore's own
    softmax backward multiplies by the row sums with broadcasting, and its CPU kernel for a broadcasting
    binary op keeps index arrays of the output's size for the life of the graph (about 25 bytes per
    element in a train step, measured); the forward is MindSpore's kernel, unchanged."""

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        rows = (dout * out).sum(-1, keepdims=True)
        return (out * (dout - ops.broadcast_to(rows, dout.shape)),)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with transformers' parameter names ``weight`` and ``bias``."""

    def __init__(self, source: WeightSource, name: str, dim: int, eps: float):
        super().__init__()
        self.weight = source.parameter(f"{name}.weight", (dim,), "ones")
        self.bias = source.parameter(f"{name}.bias", (dim,), "zeros")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=float(eps))

    def construct(self, x):
        y, _, _ = self.norm(x, self.weight, self.bias)
        return y
