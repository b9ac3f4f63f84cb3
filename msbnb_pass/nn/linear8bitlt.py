"""Linear8bitLt: LLM.int8() (Dettmers et al. 2022), int8 activations and weights with outlier decomposition."""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .. import formats
from ..errors import CheckpointError
from ..formats import _checks
from ..formats.quant_state import to_numpy
from ..kernels import kernel_class
from ..kernels import quantize as fast
from ._base import QuantLinear, _checked_bias, check_finite_stats, default_init, read_int8_rows


class _Int8FromFloatWeight(nn.Cell):
    """LLM.int8() forward on a trainable float weight (quantized row-wise each step); the backward uses
    the float weight, as bitsandbytes does with ``has_fp16_weights=True``."""

    def __init__(self, kernel: nn.Cell):
        super().__init__()
        self.kernel = kernel

    def construct(self, x, w, bias):
        scb = ops.abs(w).max(axis=1)
        factor = ops.where(scb > 0, 127.0 / ops.maximum(scb, 1e-30), ops.zeros_like(scb))
        cb = ops.cast(ops.clamp(ops.round(w * factor.reshape((-1, 1))), -127.0, 127.0), ms.int8)
        return self.kernel(x, cb, scb, bias)

    def bprop(self, x, w, bias, out, dout):
        d2 = ops.cast(dout, ms.float32).reshape((-1, dout.shape[-1]))
        x2 = ops.cast(x, ms.float32).reshape((-1, x.shape[-1]))
        dx = ops.cast(ops.matmul(d2, w).reshape(x.shape), x.dtype)
        return dx, ops.matmul(d2.T, x2), d2.sum(axis=0)


class Linear8bitLt(QuantLinear):
    """LLM.int8(): ``y = x @ W^T + b`` with int8 x int8 matmuls and float outlier columns.

    Args:
        in_features, out_features, bias: the layer's shape and whether it has a bias.
        has_fp16_weights: keep a trainable float weight (quantized on the fly each forward, gradients
            through the float weight); False (default) stores only int8 ``CB`` and ``SCB``.
        threshold: input columns holding any ``|x| >= threshold`` are multiplied in floating point
            (0.0 disables the decomposition: everything int8).
        weight, bias_value: float arrays to start from (default: nn.Dense's random initialisation).
        backend: "cpu" (fused C++ kernel: VNNI int8 dot products) or "reference".

    Parameters are bitsandbytes' own names: ``weight`` (int8 CB ``[out, in]``), ``SCB`` (float32 row
    absmax ``[out]``) and ``bias``; ``bnb_state_dict()`` adds ``weight_format`` as transformers saves it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        has_fp16_weights: bool = False,
        threshold: float = 6.0,
        *,
        weight: Any = None,
        bias_value: Any = None,
        CB: Any = None,
        SCB: Any = None,
        backend: str | None = None,
        layer_name: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, layer_name)
        owner = self.layer_name
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold < float("inf")
        ):
            raise ValueError(
                f"{owner}: threshold must be a finite float >= 0 (0.0 disables outliers), got {threshold!r}"
            )
        self.threshold = float(threshold)
        self.has_fp16_weights = bool(has_fp16_weights)
        shape = (self.out_features, self.in_features)
        if CB is not None:
            if self.has_fp16_weights:
                raise ValueError(f"{owner}: CB/SCB describe an int8 layer; has_fp16_weights must be False")
            cb, scb = np.asarray(to_numpy(CB)), np.asarray(to_numpy(SCB), np.float32).reshape(-1)
            if cb.dtype != np.int8 or cb.shape != shape or scb.shape != (self.out_features,):
                raise ValueError(
                    f"{owner}: CB must be int8 {shape} and SCB float32 ({self.out_features},), got "
                    f"{cb.dtype} {cb.shape} and {scb.shape}"
                )
        else:
            if weight is None:
                weight, init_bias = default_init(self.out_features, self.in_features, self.has_bias)
                bias_value = init_bias if bias_value is None else bias_value
            w = _checks.float_array(weight, f"{owner}: weight", ndim=2).astype(np.float32)
            if w.shape != shape:
                raise ValueError(f"{owner}: weight must have shape {shape}, got {w.shape}")
            if self.has_fp16_weights:
                cb = scb = None
                self.weight = self._param(w, "weight", requires_grad=True)
            else:
                cb, scb = fast.int8_vectorwise_quant(w)
        if cb is not None:
            check_finite_stats(owner, SCB=scb)
            self.weight = self._param(cb, "weight")
            self.SCB = self._param(scb, "SCB")
        if self.has_bias:
            b = (
                np.zeros(self.out_features, np.float32)
                if bias_value is None
                else np.asarray(to_numpy(bias_value), np.float32)
            )
            self.bias = self._param(b, "bias", requires_grad=True)
        kernel = kernel_class("llm_int8", backend)(self.in_features, self.out_features, self.threshold, self.has_bias)
        self.kernel = _Int8FromFloatWeight(kernel) if self.has_fp16_weights else kernel

    def construct(self, x):
        self._check_input(x)
        if self.has_fp16_weights:
            return self._activate(self.kernel(x, self.weight, self._bias()))
        return self._activate(self.kernel(x, self.weight, self.SCB, self._bias()))

    @classmethod
    def from_dense(
        cls,
        cell: nn.Cell,
        threshold: float = 6.0,
        has_fp16_weights: bool = False,
        backend: str | None = None,
        layer_name: str | None = None,
    ) -> Linear8bitLt:
        """Quantize an ``nn.Dense`` / ``mint.nn.Linear`` for LLM.int8()."""
        return cls._convert_dense(
            cell, layer_name, has_fp16_weights=has_fp16_weights, threshold=threshold, backend=backend
        )

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "", **kwargs: Any) -> Linear8bitLt:
        """Build from bitsandbytes' keys: ``<prefix>weight`` (int8), ``<prefix>SCB`` and ``<prefix>bias``."""
        cb, scb = read_int8_rows(state_dict, prefix, "Linear8bitLt", "[out, in] (LLM.int8() CB)")
        key = f"{prefix}weight_format"
        if key in state_dict:
            fmt = np.asarray(to_numpy(state_dict[key]))
            if fmt.size != 1 or int(fmt.reshape(-1)[0]) != 0:
                raise CheckpointError(
                    f"'{key}' = {fmt.reshape(-1).tolist()}: only format 0 (row-major int8, what bitsandbytes saves) "
                    "can be loaded"
                )
        bias = state_dict.get(f"{prefix}bias")
        if bias is not None:
            bias = _checked_bias(f"{prefix}bias", bias, cb.shape[0])
        return cls(cb.shape[1], cb.shape[0], bias is not None, CB=cb, SCB=scb, bias_value=bias, **kwargs)

    def dequantized_weight(self) -> np.ndarray:
        if self.has_fp16_weights:
            return self.weight.asnumpy().copy()
        return formats.int8_vectorwise_dequant(self.weight.asnumpy(), self.SCB.asnumpy())

    def dequantized_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.has_fp16_weights:
            return self.weight.asnumpy()[rows]
        return formats.int8_vectorwise_dequant(self.weight.asnumpy()[rows], self.SCB.asnumpy()[rows])

    def bnb_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        if self.has_fp16_weights:
            cb, scb = fast.int8_vectorwise_quant(self.weight.asnumpy())
        else:
            cb, scb = self.weight.asnumpy().copy(), self.SCB.asnumpy().copy()
        sd = {f"{prefix}weight": cb, f"{prefix}SCB": scb, f"{prefix}weight_format": np.array(0, np.uint8)}
        if self.has_bias:
            sd[f"{prefix}bias"] = self.bias.asnumpy().copy()
        return sd

    def extend_repr(self) -> str:
        backend = type(self.kernel.kernel if self.has_fp16_weights else self.kernel).__name__
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"threshold={self.threshold}, has_fp16_weights={self.has_fp16_weights}, backend={backend}"
        )
