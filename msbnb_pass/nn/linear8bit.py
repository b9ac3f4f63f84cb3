"""Linear8bit: the seed's weight-only INT8 layer (training mode with float weights, inference with int8)."""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .. import formats
from ..config import dtype_to_str
from ..formats import _checks
from ..kernels import kernel_class
from ..kernels import quantize as fast
from ._base import QuantLinear, check_finite_stats, default_init
from .linear4bit import COMPUTE_DTYPES


class Linear8bit(QuantLinear):
    """``y = x @ W^T + b`` with W as int8 ``q`` and ``W ~= (q - offset) * scale`` once quantized.

    Args:
        in_features, out_features, bias: the layer's shape and whether it has a bias.
        has_fp16_weights: start in training mode, holding a trainable float weight (float32 on CPU) and
            computing in floating point; ``quantize_weights()`` switches to int8 inference. False quantizes
            right away.
        symmetric: absmax scaling (the offset is zero) or min/max scaling with an integer zero point.
        per_channel: one scale per output row, or one for the whole weight.
        weight, bias_value: float arrays to start from (default: nn.Dense's random initialisation).
        compute_dtype: how the int8 layer computes (see the README's "compute_dtype"): "float32" (exact
            products of the dequantized weight; the default), "float16" (input and output rounded to
            float16), "bfloat16" (input and dequantized weight rounded to bfloat16, float32 sums) or "int8"
            (opt-in W8A8: activations quantized to int8 per row and block of 128, int32 sums; symmetric
            weights only). The float training mode always computes in the input's dtype.
        backend: "cpu" (fused C++ kernel) or "reference".

    Quantized parameters: ``weight`` (int8 ``[out, in]``), ``weight_scale`` (float32 ``[out]`` or ``[1]``),
    ``weight_offset`` (asymmetric only) and ``bias``. A symmetric per-channel layer is bitsandbytes'
    LLM.int8 weight format: ``bnb_state_dict()`` writes it as ``weight`` + ``SCB`` (= 127 * scale).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        symmetric: bool = True,
        per_channel: bool = True,
        *,
        weight: Any = None,
        bias_value: Any = None,
        compute_dtype: Any = "float32",
        backend: str | None = None,
        layer_name: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, layer_name)
        dtype = dtype_to_str(compute_dtype)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"{self.layer_name}: compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}"
            )
        if dtype == "int8" and not symmetric:
            raise ValueError(
                f"{self.layer_name}: compute_dtype='int8' needs a symmetric int8 weight; symmetric=False is not "
                "supported"
            )
        self.compute_dtype_name = dtype
        cast_to, self.compute_mode = COMPUTE_DTYPES[dtype]
        self._cast_input = cast_to is not None
        self.compute_dtype = cast_to if cast_to is not None else (ms.bfloat16 if dtype == "bfloat16" else ms.int8)
        self.symmetric = bool(symmetric)
        self.per_channel = bool(per_channel)
        self.backend = backend
        if weight is None:
            weight, init_bias = default_init(self.out_features, self.in_features, self.has_bias)
            bias_value = init_bias if bias_value is None else bias_value
        w = _checks.float_array(weight, f"{self.layer_name}: weight", ndim=2).astype(np.float32)
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.layer_name}: weight must have shape {(self.out_features, self.in_features)}, got {w.shape}"
            )
        if self.has_bias:
            b = np.zeros(self.out_features, np.float32) if bias_value is None else np.asarray(bias_value, np.float32)
            self.bias = self._param(b, "bias", requires_grad=True)
        self.has_fp16_weights = True
        self.weight = self._param(w, "weight", requires_grad=True)
        self.weight_scale = Tensor(np.ones(1, np.float32))
        self.weight_offset = Tensor(np.zeros(1, np.float32))
        self.kernel = None
        if not has_fp16_weights:
            self.quantize_weights()

    def quantize_weights(self) -> Linear8bit:
        """Switch to inference: quantize the float weight to int8 and drop it. Returns self.

        Call it before compiling the network (a graph compiled in training mode keeps the float path).
        """
        if not self.has_fp16_weights:
            return self
        prefix = self.weight.name[: -len("weight")] if self.weight.name.endswith("weight") else ""
        w = self.weight.asnumpy()
        q, scale, offset = fast.quantize_int8(w, symmetric=self.symmetric, per_channel=self.per_channel)
        self._set_quantized(q, scale, offset)
        self.name_parameters(prefix)
        return self

    def _set_quantized(self, q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> None:
        check_finite_stats(self.layer_name, weight_scale=scale, weight_offset=offset)
        self.weight = self._param(q, "weight")
        self.weight_scale = self._param(scale.astype(np.float32), "weight_scale")
        if offset is not None:
            self.weight_offset = self._param(offset.astype(np.float32), "weight_offset")
        self.has_fp16_weights = False
        self.kernel = kernel_class("linear8bit", self.backend)(
            self.in_features, self.out_features, not self.symmetric, self.has_bias, self.compute_mode
        )

    def construct(self, x):
        self._check_input(x)
        if self.has_fp16_weights:
            y = ops.matmul(x, self._cast(self.weight, x.dtype).T)
            if self.has_bias:
                y = y + self._cast(self.bias, x.dtype)
            return self._activate(y)
        xc = x
        if self._cast_input:
            xc = self._cast(x, self.compute_dtype)
        y = self.kernel(xc, self.weight, self.weight_scale, self.weight_offset, self._bias())
        return self._activate(self._cast(y, x.dtype))

    @classmethod
    def from_dense(
        cls,
        cell: nn.Cell,
        symmetric: bool = True,
        per_channel: bool = True,
        backend: str | None = None,
        layer_name: str | None = None,
        compute_dtype: Any = "float32",
    ) -> Linear8bit:
        """Quantize an ``nn.Dense`` / ``mint.nn.Linear`` to int8 (inference mode)."""
        return cls._convert_dense(
            cell,
            layer_name,
            has_fp16_weights=False,
            symmetric=symmetric,
            per_channel=per_channel,
            backend=backend,
            compute_dtype=compute_dtype,
        )

    def dequantized_weight(self) -> np.ndarray:
        if self.has_fp16_weights:
            return self.weight.asnumpy().copy()
        offset = self.weight_offset.asnumpy() if not self.symmetric else None
        return formats.dequantize_int8(self.weight.asnumpy(), self.weight_scale.asnumpy(), offset)

    def dequantized_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.has_fp16_weights:
            return self.weight.asnumpy()[rows]
        scale = self.weight_scale.asnumpy()
        offset = self.weight_offset.asnumpy() if not self.symmetric else None
        if self.per_channel:
            scale = scale[rows]
            offset = None if offset is None else offset[rows]
        return formats.dequantize_int8(self.weight.asnumpy()[rows], scale, offset)

    def _int8_operands(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """int8 compute: (the int8 codes [R, K], the row scale per activation block [R, nb], the block)."""
        from ..formats.compute import INT8_WEIGHT_BLOCK

        scale = self.weight_scale.asnumpy().astype(np.float32)
        scale = scale[rows] if scale.size > 1 else np.full(rows.size, scale[0], np.float32)
        nb = -(-self.in_features // INT8_WEIGHT_BLOCK)
        return self.weight.asnumpy()[rows], np.repeat(scale[:, None], nb, axis=1), INT8_WEIGHT_BLOCK

    def bnb_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """bitsandbytes' Linear8bitLt keys (``weight`` int8, ``SCB``, ``weight_format``) for a symmetric
        per-channel layer; other layouts have no bitsandbytes equivalent."""
        if self.has_fp16_weights:
            raise ValueError(f"{self.layer_name}: call quantize_weights() before exporting an int8 state dict")
        if not (self.symmetric and self.per_channel):
            raise ValueError(
                f"{self.layer_name}: only symmetric per-channel int8 is bitsandbytes' format "
                f"(this layer is symmetric={self.symmetric}, per_channel={self.per_channel})"
            )
        sd = {
            f"{prefix}weight": self.weight.asnumpy().copy(),
            f"{prefix}SCB": (self.weight_scale.asnumpy() * np.float32(127.0)).astype(np.float32),
            f"{prefix}weight_format": np.array(0, np.uint8),
        }
        if self.has_bias:
            sd[f"{prefix}bias"] = self.bias.asnumpy().copy()
        return sd

    def extend_repr(self) -> str:
        mode = "training (float weights)" if self.has_fp16_weights else "int8"
        kind = ("symmetric" if self.symmetric else "asymmetric") + (
            ", per_channel" if self.per_channel else ", per_tensor"
        )
        backend = "" if self.kernel is None else f", backend={type(self.kernel).__name__}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"mode={mode}, {kind}, compute_dtype={self.compute_dtype_name}{backend}"
        )
