"""Linear4bit: a Linear layer with NF4 / FP4 / INT4 blockwise 4-bit weights (QLoRA's base layer)."""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from .. import formats
from ..config import dtype_to_str
from ..errors import QuantizationError
from ..formats import _checks
from ..formats.codebooks import QUANT_TYPES_4BIT
from ..formats.quant_state import QuantState
from ..kernels import kernel_class
from ..kernels import quantize as fast
from ._base import QuantLinear, _checked_bias, default_init
from ._packed4bit import Packed4bitWeight, read_packed_4bit

# compute dtype -> (dtype the input is cast to before the kernel or None, the kernel's compute mode)
COMPUTE_DTYPES = {
    "float32": (ms.float32, "float32"),
    "float16": (ms.float16, "float32"),
    "bfloat16": (None, "bfloat16"),
    "int8": (None, "int8"),
}


class Linear4bit(Packed4bitWeight, QuantLinear):
    """``y = x @ dequant(W)^T + b`` with W stored as packed 4-bit codes and blockwise absmax.

    Args:
        in_features, out_features: the layer's shape (weight ``[out, in]``).
        bias: whether the layer has a (float, trainable) bias.
        quant_type: "nf4" (default, QLoRA), "fp4" (bitsandbytes' own default) or "int4" (linear).
        blocksize: elements per absmax block, a power of two in [32, 4096]; ``group_size`` is an alias.
        compress_statistics: double-quantize the absmax (8-bit, blocks of 256): ~4.13 instead of 4.5 bits
            per weight at blocksize 64.
        compute_dtype: how the products are computed (see the README's "compute_dtype"): "float32"
            (exact products, float32 sums; the default), "float16" (the input is rounded to float16, the
            output too), "bfloat16" (input and decoded weights rounded to bfloat16, float32 sums:
            AVX512-BF16's vdpbf16ps or its exact emulation; input and output keep their dtype) or "int8"
            (opt-in W4A8: activations quantized to int8 per row and block on the fly, the 16 codes as
            int8 levels, int32 sums per block; needs in_features % blocksize == 0 and a symmetric code).
            MindSpore/numpy/torch dtypes and their names are accepted.
        symmetric: int4 only; False stores each block's midpoint and uses 16 levels over its range.
        weight, bias_value: float arrays to quantize (default: nn.Dense's random initialisation).
        backend: "cpu" (fused C++ kernel) or "reference"; default: the kernels module's choice.

    Parameters carry bitsandbytes' state-dict names with ``_`` for ``.`` (MindSpore attribute names cannot
    hold dots): ``weight`` (uint8 ``[(out*in+1)//2, 1]``), ``weight_absmax``, ``weight_quant_map``,
    ``weight_nested_absmax``, ``weight_nested_quant_map``, ``weight_nested_offset`` (bitsandbytes keeps the
    offset in the JSON of ``weight.quant_state.bitsandbytes__<type>``), ``weight_block_offset`` (asymmetric
    int4) and ``bias``. ``bnb_state_dict()`` writes the exact bitsandbytes keys.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int | None = None,
        compress_statistics: bool = True,
        compute_dtype: Any = "float32",
        *,
        group_size: int | None = None,
        symmetric: bool = True,
        weight: Any = None,
        bias_value: Any = None,
        quant_state: QuantState | None = None,
        packed: Any = None,
        backend: str | None = None,
        layer_name: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, layer_name)
        owner = self.layer_name
        self._weight_shape = (self.out_features, self.in_features)
        if blocksize is not None and group_size is not None and blocksize != group_size:
            raise ValueError(f"{owner}: blocksize={blocksize} and group_size={group_size} disagree (they are aliases)")
        blocksize = blocksize if blocksize is not None else (group_size if group_size is not None else 64)
        self.blocksize = _checks.check_blocksize(blocksize, f"{owner}: blocksize")
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"{owner}: quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if not symmetric and quant_type != "int4":
            raise ValueError(f"{owner}: symmetric=False is only defined for quant_type='int4', got {quant_type!r}")
        dtype = dtype_to_str(compute_dtype)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{owner}: compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        if dtype == "int8" and not symmetric:
            raise ValueError(f"{owner}: compute_dtype='int8' needs a symmetric code; symmetric=False is not supported")
        self.quant_type = quant_type
        self.compress_statistics = bool(compress_statistics)
        self.symmetric = bool(symmetric)
        self.compute_dtype_name = dtype
        cast_to, self.compute_mode = COMPUTE_DTYPES[dtype]
        self._cast_input = cast_to is not None
        self.compute_dtype = cast_to if cast_to is not None else (ms.bfloat16 if dtype == "bfloat16" else ms.int8)

        if quant_state is None:
            if weight is None:
                weight, init_bias = default_init(self.out_features, self.in_features, self.has_bias)
                bias_value = init_bias if bias_value is None else bias_value
            w = _checks.float_array(weight, f"{owner}: weight", ndim=2)
            if w.shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"{owner}: weight must have shape {(self.out_features, self.in_features)}, got {w.shape}"
                )
            try:
                packed, quant_state = fast.quantize_4bit(
                    w, self.blocksize, quant_type, self.compress_statistics, symmetric=self.symmetric
                )
            except QuantizationError as exc:
                raise QuantizationError(f"{owner}: weight: {str(exc).removeprefix('A: ')}") from None
        if dtype == "int8" and self.in_features % self.blocksize:
            raise ValueError(
                f"{owner}: compute_dtype='int8' needs in_features ({self.in_features}) to be a multiple of the "
                f"blocksize ({self.blocksize})"
            )
        self._load_quantized(np.asarray(packed), quant_state)
        if self.has_bias:
            b = np.zeros(self.out_features, np.float32) if bias_value is None else np.asarray(bias_value, np.float32)
            if b.shape != (self.out_features,):
                raise ValueError(f"{owner}: bias must have shape ({self.out_features},), got {b.shape}")
            self.bias = self._param(b, "bias", requires_grad=True)
        self.kernel = kernel_class("linear4bit", backend)(
            self.in_features,
            self.out_features,
            self.blocksize,
            self.quant_state.nested,
            self.quant_state.state2.blocksize if self.quant_state.nested else 256,
            not self.quant_state.symmetric,
            self.has_bias,
            self.compute_mode,
        )

    def construct(self, x):
        self._check_input(x)
        xc = x
        if self._cast_input:
            xc = self._cast(x, self.compute_dtype)
        y = self.kernel(
            xc,
            self.weight,
            self.weight_absmax,
            self.weight_quant_map,
            self.weight_nested_absmax,
            self.weight_nested_quant_map,
            self.weight_nested_offset,
            self.weight_block_offset,
            self._bias(),
        )
        return self._activate(self._cast(y, x.dtype))

    # ---- conversion ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        cell: nn.Cell,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Any = "float32",
        symmetric: bool = True,
        backend: str | None = None,
        layer_name: str | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Dense`` / ``mint.nn.Linear`` (weight, bias and activation)."""
        return cls._convert_dense(
            cell,
            layer_name,
            quant_type=quant_type,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            compute_dtype=compute_dtype,
            symmetric=symmetric,
            backend=backend,
        )

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "", **kwargs: Any) -> Linear4bit:
        """Build from bitsandbytes' state-dict entries (``<prefix>weight``, ``<prefix>weight.absmax``, ...)."""
        qs, packed = read_packed_4bit(state_dict, prefix, "Linear4bit", "[out, in]")
        bias = state_dict.get(f"{prefix}bias")
        out_features, in_features = qs.shape
        if bias is not None:
            bias = _checked_bias(f"{prefix}bias", bias, out_features)
        return cls(
            in_features,
            out_features,
            bias is not None,
            qs.quant_type,
            qs.blocksize,
            qs.nested,
            quant_state=qs,
            packed=packed,
            bias_value=bias,
            symmetric=qs.symmetric,
            **kwargs,
        )

    def bnb_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """This layer's state dict with bitsandbytes' keys (what transformers saves for a Linear4bit)."""
        sd = self._weight_state_dict(prefix)
        if self.has_bias:
            sd[f"{prefix}bias"] = self.bias.asnumpy().copy()
        return sd

    def dequantized_weight(self) -> np.ndarray:
        return formats.dequantize_4bit(self.weight.asnumpy(), self.current_quant_state())

    def dequantized_rows(self, rows) -> np.ndarray:
        """Dequantized weight rows (output features) ``rows``, without decoding the whole weight."""
        return formats.dequantize_4bit_rows(self.weight.asnumpy(), self.current_quant_state(), rows)

    def _int8_operands(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """int8 compute: (int8 levels [R, K], weight scale per block float32 [R, K / blocksize], blocksize)."""
        from ..formats.compute import int8_levels

        qs = self.current_quant_state()
        k, bs = self.in_features, self.blocksize
        flat = rows[:, None] * k + np.arange(k, dtype=np.int64)[None, :]
        byte = self.weight.asnumpy().reshape(-1)[flat >> 1]
        idx = np.where(flat & 1, byte & 0x0F, byte >> 4)
        nb = k // bs
        blocks = rows[:, None] * nb + np.arange(nb, dtype=np.int64)[None, :]
        wscale = qs.dequantized_absmax().astype(np.float32)[blocks] * (np.float32(1.0) / np.float32(127.0))
        return int8_levels(qs.code)[idx], wscale.astype(np.float32), bs

    def extend_repr(self) -> str:
        dq = ", double_quant" if self.quant_state.nested else ""
        asym = ", asymmetric" if not self.quant_state.symmetric else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}{asym}, "
            f"compute_dtype={self.compute_dtype_name}, bits_per_weight={self.bits_per_weight():.3f}, "
            f"backend={type(self.kernel).__name__}"
        )
