"""Building blocks shared by the models, and the hook through which a loader supplies their weights.

A model asks a :class:`WeightSource` for every parameter by its transformers name (``model.norm.weight``)
and for every linear layer (``model.layers.0.mlp.up_proj``). The default source initialises randomly; a
checkpoint loader answers with the stored arrays, or with an already-quantized cell, so a loaded network
never holds a float copy of a layer that is stored quantized. The models themselves know nothing of
quantization: a linear layer is whatever ``WeightSource.dense`` returns, ``nn.Dense`` by default.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops


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

    def dense(self, name: str, in_features: int, out_features: int, has_bias: bool) -> nn.Cell:
        """The linear layer ``name`` (weight ``[out, in]``): an ``nn.Dense`` by default."""
        w = self.array(f"{name}.weight", (out_features, in_features), "normal")
        b = self.array(f"{name}.bias", (out_features,), "zeros") if has_bias else None
        return nn.Dense(
            in_features,
            out_features,
            weight_init=Tensor(w),
            bias_init=Tensor(b) if b is not None else "zeros",
            has_bias=has_bias,
        )

    def parameter(self, name: str, shape: tuple[int, ...], init: str) -> Parameter:
        return Parameter(Tensor(self.array(name, shape, init)), name=name.rsplit(".", 1)[-1])


def name_parameters(net: nn.Cell) -> None:
    """Name every parameter after its path in the cell tree (= its transformers state-dict key)."""
    for path, param in net.parameters_and_names():
        param.name = path


class Embedding(nn.Cell):
    """A lookup table with the parameter named ``weight`` (as in transformers), ``[num, dim]``."""

    def __init__(self, source: WeightSource, name: str, num: int, dim: int):
        super().__init__()
        self.weight = source.parameter(f"{name}.weight", (num, dim), "normal")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (float32)."""

    def __init__(self, source: WeightSource, name: str, dim: int, eps: float):
        super().__init__()
        self.weight = source.parameter(f"{name}.weight", (dim,), "ones")
        self.eps = float(eps)

    def construct(self, x):
        var = ops.mean(x * x, -1, keep_dims=True)
        return x * ops.rsqrt(var + self.eps) * self.weight


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
