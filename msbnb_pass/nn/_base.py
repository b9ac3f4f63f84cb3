"""What the quantized Linear cells share: validation, naming, conversion from float layers, accounting."""

from __future__ import annotations

import math
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from ..errors import CheckpointError, CheckpointKeyError, MsbnbError, QuantizationError
from ..formats.quant_state import to_numpy

FLOAT_INPUTS = (ms.float32, ms.float16)


def _positive_int(name: str, value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def dense_parts(cell: nn.Cell) -> tuple[np.ndarray, np.ndarray | None, nn.Cell | None, str]:
    """(weight [out, in] float32, bias or None, activation cell or None, parameter-name prefix) of a float
    Linear layer: ``mindspore.nn.Dense`` or ``mindspore.mint.nn.Linear``."""
    from mindspore import mint

    if not isinstance(cell, (nn.Dense, mint.nn.Linear)):
        raise TypeError(
            f"from_dense expects a mindspore.nn.Dense or mindspore.mint.nn.Linear, got {type(cell).__module__}."
            f"{type(cell).__name__}"
        )
    weight = to_numpy(cell.weight).astype(np.float32)
    if weight.ndim != 2:
        raise ValueError(f"from_dense: the weight of {cell.weight.name} must be 2-D [out, in], got {weight.shape}")
    bias = getattr(cell, "bias", None)
    has_bias = bias is not None and (getattr(cell, "has_bias", True) is not False)
    b = to_numpy(bias).astype(np.float32) if has_bias else None
    activation = getattr(cell, "activation", None) if getattr(cell, "activation_flag", False) else None
    name = cell.weight.name
    prefix = name[: -len("weight")] if name.endswith("weight") else ""
    return weight, b, activation, prefix


def default_init(out_features: int, in_features: int, has_bias: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """nn.Dense's default initialisation (He-uniform weight, uniform bias), as float32 arrays."""
    w = initializer(HeUniform(math.sqrt(5)), [out_features, in_features], ms.float32).init_data().asnumpy()
    b = None
    if has_bias:
        bound = 1.0 / math.sqrt(in_features)
        b = initializer(Uniform(bound), [out_features], ms.float32).init_data().asnumpy()
    return w.astype(np.float32), b


def check_finite_stats(owner: str, error: type[MsbnbError] = QuantizationError, **arrays: np.ndarray | None) -> None:
    """Statistics with NaN/Inf would silently poison every output: refuse them, naming the layer, the
    tensor, the first bad index and its value."""
    for name, arr in arrays.items():
        if arr is None or arr.dtype.kind != "f":
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.flatnonzero(bad.reshape(-1))[0])
            raise error(
                f"{owner}: {name} holds {int(bad.sum())} non-finite value(s) (first at index "
                f"{first}): {arr.reshape(-1)[first]!r}; the quantization statistics must be finite"
            )


def _checked_bias(key: str, value: Any, out_features: int) -> np.ndarray:
    """A state dict's bias as float32 [out], or a CheckpointError naming the tensor."""
    b = np.asarray(to_numpy(value))
    if b.dtype.kind != "f" or b.shape != (out_features,):
        raise CheckpointError(
            f"'{key}' must be a float tensor of shape [{out_features}], got {b.dtype} of shape {list(b.shape)}"
        )
    check_finite_stats(key.rpartition(".")[0] or "<root>", CheckpointError, **{key.rpartition(".")[2]: b})
    return b.astype(np.float32)


def read_int8_rows(state_dict: dict, prefix: str, owner: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """``<prefix>weight`` (a 2-D int8 tensor laid out as ``layout``) and ``<prefix>SCB`` (one finite absmax >= 0
    per row) from bitsandbytes' row-wise int8 keys, checked; ``owner`` names the cell in errors."""
    for key in (f"{prefix}weight", f"{prefix}SCB"):
        if key not in state_dict:
            raise CheckpointKeyError(f"state dict lacks '{key}' needed by {owner}")
    key = f"{prefix}weight"
    cb = np.asarray(to_numpy(state_dict[key]))
    if cb.dtype != np.int8 or cb.ndim != 2 or 0 in cb.shape:
        raise CheckpointError(f"'{key}' must be a 2-D int8 tensor {layout}, got {cb.dtype} of shape {list(cb.shape)}")
    key = f"{prefix}SCB"
    scb = np.asarray(to_numpy(state_dict[key]))
    if scb.dtype.kind != "f" or scb.ndim != 1 or scb.size != cb.shape[0]:
        raise CheckpointError(
            f"'{key}' must be a float tensor of shape [{cb.shape[0]}] (one absmax per row of the weight), got "
            f"{scb.dtype} of shape {list(scb.shape)}"
        )
    bad = ~np.isfinite(scb) | (scb < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(
            f"'{key}' holds an invalid row absmax at index {i}: {scb[i]!r}; it must be finite and >= 0"
        )
    return cb, scb


class QuantParams:
    """What every quantized cell (linear or embedding) does with its parameters: make them from arrays, name
    them after a tree path, count their bytes. A mixin for ``nn.Cell`` subclasses."""

    def _param(self, value: np.ndarray, attr: str, requires_grad: bool = False) -> Parameter:
        return Parameter(Tensor(np.ascontiguousarray(value)), name=attr, requires_grad=requires_grad)

    def name_parameters(self, prefix: str) -> None:
        """Name every parameter ``<prefix><attribute>`` (e.g. ``"layers.0.fc1."``), as a tree would."""
        for attr, param in self.parameters_and_names(expand=False):
            param.name = f"{prefix}{attr}"

    def parameter_nbytes(self) -> int:
        """Bytes held by this cell's parameters (what quantization saves is measured on this)."""
        return int(sum(p.size * p.itemsize for p in self.get_parameters()))


class QuantLinear(QuantParams, nn.Cell):
    """Base of Linear8bit, Linear8bitLt and Linear4bit: a Linear layer [out, in] with quantized weights."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, layer_name: str | None = None):
        super().__init__()
        owner = layer_name or type(self).__name__
        self.in_features = _positive_int("in_features", in_features, owner)
        self.out_features = _positive_int("out_features", out_features, owner)
        self.has_bias = bool(has_bias)
        self.layer_name = owner
        self.activation = None
        self.activation_flag = False
        # a constant zero bias for the kernels when the layer has none
        self._zero_bias = Tensor(np.zeros(self.out_features, np.float32))

    # ---- construct helpers (graph-mode compatible) ------------------------------------------------------------
    def _check_input(self, x):
        if x.dtype not in FLOAT_INPUTS:
            raise TypeError(f"{self.layer_name}: input must be float32 or float16, got {x.dtype}")
        if len(x.shape) < 1:
            raise ValueError(
                f"{self.layer_name}: input must have at least one dimension (..., {self.in_features}), got a scalar"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer_name}: the input's last dimension must be in_features={self.in_features}, "
                f"got input shape {x.shape}"
            )

    def _bias(self):
        if self.has_bias:
            return self.bias
        return self._zero_bias

    def _activate(self, y):
        if self.activation_flag:
            return self.activation(y)
        return y

    # ---- python-side helpers ------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight, bias=None, activation=None, layer_name: str | None = None, **kwargs: Any):
        """Quantize a float linear layer given as arrays: ``y = activation(x @ weight.T + bias)``.

        ``kwargs`` are the class's constructor options (quant_type, threshold, ...)."""
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            weight=weight,
            bias_value=bias,
            layer_name=layer_name,
            **kwargs,
        )
        layer._set_activation(activation)
        return layer

    @classmethod
    def _convert_dense(cls, cell: nn.Cell, layer_name: str | None, **kwargs: Any):
        """The shared part of ``from_dense``: read the float layer, quantize it with ``from_float`` and name
        the parameters after the replaced layer's."""
        weight, bias, activation, prefix = dense_parts(cell)
        layer = cls.from_float(weight, bias, activation, layer_name or prefix.rstrip(".") or None, **kwargs)
        layer.name_parameters(prefix)
        return layer

    def _set_activation(self, activation: nn.Cell | None) -> None:
        if activation is not None:
            self.activation = activation
            self.activation_flag = True

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight and its statistics (the bias excluded)."""
        bias = self.bias.size * self.bias.itemsize if self.has_bias else 0
        return self.parameter_nbytes() - int(bias)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.in_features * self.out_features)

    def _bias_numpy(self) -> np.ndarray | None:
        return self.bias.asnumpy().copy() if self.has_bias else None

    def dequantize(self) -> nn.Dense:
        """A float ``nn.Dense`` with the dequantized weight (and the bias and activation)."""
        dense = nn.Dense(
            self.in_features,
            self.out_features,
            weight_init=Tensor(self.dequantized_weight()),
            bias_init=Tensor(self._bias_numpy()) if self.has_bias else "zeros",
            has_bias=self.has_bias,
        )
        if self.activation_flag:
            dense.activation = self.activation
            dense.activation_flag = True
        return dense

    def dequantized_weight(self) -> np.ndarray:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def dequantized_rows(self, rows) -> np.ndarray:
        """Dequantized weight rows ``rows`` (subclasses decode only those rows)."""
        return self.dequantized_weight()[np.asarray(rows, dtype=np.int64)]

    compute_mode = "float32"

    def kernel_reference(self, x: np.ndarray, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """What the kernel computes for output columns ``rows`` (default all) of ``x @ W^T`` (no bias), in
        float64, and a bound on how far the kernel's float32 result may be from it:
        ``(reference [M, len(rows)], bound [M, len(rows)])``.

        float32 compute: the product with the dequantized weights, Higham's bound
        ``gamma_(K+3) * |x| @ |W|^T`` (u = 2^-24). bfloat16: the same with both operands rounded to bf16.
        int8: the exact value of the blockwise int8 computation and ``gamma_(nb+2)`` times its magnitude
        (``msbnb_pass.formats.compute``)."""
        from ..formats import compute

        x2 = np.asarray(x, np.float32).reshape(-1, self.in_features)
        rows = np.arange(self.out_features) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        u = 2.0**-24
        if self.compute_mode == "int8":
            levels, wscale, block = self._int8_operands(rows)
            ref, mag = compute.int8_matmul(x2, levels, wscale, block)
            nb = wscale.shape[1]
            return ref, (nb + 2) * u / (1 - (nb + 2) * u) * mag + 1e-30
        w = self.dequantized_rows(rows)
        if self.compute_mode == "bfloat16":
            x2, w = compute.bf16_round(x2), compute.bf16_round(w)
        x64, w64 = x2.astype(np.float64), w.astype(np.float64)
        k = self.in_features
        gamma = (k + 3) * u / (1 - (k + 3) * u)
        return x64 @ w64.T, gamma * (np.abs(x64) @ np.abs(w64).T) + 1e-30

    def _int8_operands(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover
        raise NotImplementedError

    def _cast(self, x, dtype):
        if x.dtype == dtype:
            return x
        return ops.cast(x, dtype)
