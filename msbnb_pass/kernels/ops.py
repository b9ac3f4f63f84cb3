"""The quantized matmul ops as small MindSpore Cells, one per (op, backend).

Backend "cpu" runs the fused C++ kernels as ``ops.Custom(func_type="aot")`` (with C++ shape inference,
so dynamic shapes work in graph mode, and a bprop that computes the input gradient with the dx kernels).
Backend "reference" dequantizes with MindSpore ops and calls MatMul: correct everywhere the library is
missing, and the oracle the fused kernels are tested against.

Every op cell has ``construct(x, <weight tensors>, bias)`` with the weight tensors in the order the
quantized layers keep them; the layer's static layout (sizes, block sizes, flags) is fixed at
construction. Nothing here runs numpy inside ``construct``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import MappingProxyType

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import CustomRegOp, DataType

from . import _lib

FLAG_NESTED, FLAG_ASYM, FLAG_BIAS, FLAG_BF16, FLAG_INT8 = 1, 2, 4, 8, 16
# how the products are computed: float32 (exact products), bfloat16 (operands rounded to bf16, float32
# sums) or int8 (activations quantized per row and block, int32 sums per block)
COMPUTE_MODES = ("float32", "bfloat16", "int8")
I8_BLOCK_INT8 = 128  # activation block of the int8 weight-only layer in int8 compute (kI8Block in C++)
_FLT_MIN = 1.1754943508222875e-38


def _check_compute(compute: str) -> str:
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    return compute


def _bf16_round(t):
    """Round float32 to bfloat16 (nearest even) and back, reading values below the smallest normal as zero
    (what the kernels and vdpbf16ps do)."""
    t = ops.where(ops.abs(t) < _FLT_MIN, ops.zeros_like(t), t)
    return ops.cast(ops.cast(t, ms.bfloat16), ms.float32)


def _quantize_blocks(x2, nblocks: int, block: int):
    """int8 activations per row and block: (codes as float [M, nb, B], scale [M, nb, 1])."""
    m = x2.shape[0]
    pad = nblocks * block - x2.shape[1]
    if pad:
        x2 = ops.concat((x2, ops.zeros((m, pad), ms.float32)), axis=1)
    xb = x2.reshape((m, nblocks, block))
    amax = ops.amax(ops.abs(xb), axis=2, keepdims=True)
    factor = ops.where(amax > 0, 127.0 / ops.maximum(amax, 1e-38), ops.zeros_like(amax))
    xq = ops.clamp(ops.round(xb * factor), -127.0, 127.0)
    return xq, amax / 127.0


def _int8_compute(x2, levels, wscale, nblocks: int, block: int):
    """sum over blocks of dot(x codes, weight levels) * s_x * s_w, the dots exact (float64).

    levels: [N, nb*B] float (padded with zeros), wscale: [N, nb]."""
    bad = ops.logical_not(ops.isfinite(x2)).any(axis=1, keep_dims=True)
    x_ok = ops.where(ops.broadcast_to(bad, x2.shape), ops.zeros_like(x2), x2)
    xq, sx = _quantize_blocks(x_ok, nblocks, block)
    n = levels.shape[0]
    wl = levels.reshape((n, nblocks, block)).transpose(1, 2, 0)  # [nb, B, N]
    dots = ops.bmm(ops.cast(xq.transpose(1, 0, 2), ms.float64), ops.cast(wl, ms.float64))  # [nb, M, N]
    scale = ops.cast(sx.transpose(1, 0, 2), ms.float64) * ops.cast(wscale.T.reshape((nblocks, 1, n)), ms.float64)
    return ops.cast((dots * scale).sum(axis=0), ms.float32), bad


# the primitive, not ops.zeros_like: the functional form fails inside a Cell bprop in GRAPH_MODE
_zeros_like = ops.ZerosLike()


# ---- registry --------------------------------------------------------------------------------------------
# The built-in table is a literal at the end of this module (nothing registers itself at import time). Users
# add implementations with an explicit register_kernel call; those live in their own table and win.
_USER_KERNELS: dict[str, dict[str, type[nn.Cell]]] = {}


def register_kernel(op: str, backend: str):
    """Class decorator: use an op Cell as the implementation of ``op`` on ``backend`` (explicit call)."""
    if not isinstance(op, str) or not op or not isinstance(backend, str) or not backend:
        raise ValueError(f"register_kernel needs an op name and a backend name, got {op!r}, {backend!r}")

    def wrap(cls: type[nn.Cell]) -> type[nn.Cell]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Cell)):
            raise TypeError(f"register_kernel({op!r}, {backend!r}) needs an nn.Cell subclass, got {cls!r}")
        _USER_KERNELS.setdefault(op, {})[backend] = cls
        return cls

    return wrap


def kernel_class(op: str, backend: str) -> type[nn.Cell]:
    impls = {**KERNELS.get(op, {}), **_USER_KERNELS.get(op, {})}
    if not impls:
        known = sorted({*KERNELS, *_USER_KERNELS})
        raise KeyError(f"unknown kernel op {op!r}; known: {known}")
    if backend not in impls:
        raise KeyError(f"op {op!r} has no {backend!r} implementation; available: {sorted(impls)}")
    return impls[backend]


# ---- aot op construction -----------------------------------------------------------------------------------
def _path() -> str:
    path = _lib.library_path()
    if path is None or not _lib.available():
        raise RuntimeError("the 'cpu' backend needs the msbnb_pass kernel library, which is not available")
    return str(path)


def _reg(name: str, inputs: list[str], formats: list[tuple]) -> dict:
    reg = CustomRegOp(name)
    for i, n in enumerate(inputs):
        reg = reg.input(i, n)
    reg = reg.output(0, "y")
    for fmt in formats:
        reg = reg.dtype_format(*fmt)
    return reg.target("CPU").get_op_info()


def _same_dtype(x, *_):
    return x


F32, F16, U8, I8, I64 = (
    DataType.F32_Default,
    DataType.F16_Default,
    DataType.U8_Default,
    DataType.I8_Default,
    DataType.I64_Default,
)
_W4_INPUTS = ["packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset", "block_offset"]


def _w4_formats(dx: bool) -> list[tuple]:
    """dtype rows: forward (x, weights..., bias, meta) -> y; dx (dy, weights..., meta, x) -> dx."""
    rows = []
    for act in (F32, F16):
        for absmax in (F32, U8):
            weights = (U8, absmax, F32, F32, F32, F32, F32)
            rows.append((act, *weights, I64, act, act) if dx else (act, *weights, F32, I64, act))
    return rows


@cache
def _linear4bit_dx_op():
    inputs = ["dy", *_W4_INPUTS, "meta", "x"]
    return ops.Custom(
        f"{_path()}:MsbnbLinear4bitDx",
        out_shape=None,
        out_dtype=lambda dy, *rest: rest[-1],
        func_type="aot",
        reg_info=_reg("MsbnbLinear4bitDx", inputs, _w4_formats(dx=True)),
    )


def _sum_rows(dout):
    return dout.reshape((-1, dout.shape[-1])).sum(axis=0)


def _grads_linear4bit(x, packed, absmax, code, nabs, ncode, noff, boff, meta, dout, dbias):
    """The input gradient by the dx kernel, zeros for the frozen quantized state, ``dbias`` for the bias."""
    dx = _linear4bit_dx_op()(dout, packed, absmax, code, nabs, ncode, noff, boff, meta, x)
    return (
        dx,
        _zeros_like(packed),
        _zeros_like(absmax),
        _zeros_like(code),
        _zeros_like(nabs),
        _zeros_like(ncode),
        _zeros_like(noff),
        _zeros_like(boff),
        dbias,
        _zeros_like(meta),
    )


def _bprop_linear4bit(x, packed, absmax, code, nabs, ncode, noff, boff, bias, meta, out, dout):
    dbias = ops.cast(_sum_rows(dout), bias.dtype)
    return _grads_linear4bit(x, packed, absmax, code, nabs, ncode, noff, boff, meta, dout, dbias)


def _bprop_linear4bit_nobias(x, packed, absmax, code, nabs, ncode, noff, boff, bias, meta, out, dout):
    """As ``_bprop_linear4bit`` for a layer without a bias (its input is a constant zero vector): no
    column sums of ``dout``, three graph nodes fewer per layer in a train step."""
    return _grads_linear4bit(x, packed, absmax, code, nabs, ncode, noff, boff, meta, dout, _zeros_like(bias))


@cache
def _linear4bit_op(has_bias: bool = True):
    inputs = ["x", *_W4_INPUTS, "bias", "meta"]
    return ops.Custom(
        f"{_path()}:MsbnbLinear4bit",
        out_shape=None,
        out_dtype=_same_dtype,
        func_type="aot",
        bprop=_bprop_linear4bit if has_bias else _bprop_linear4bit_nobias,
        reg_info=_reg("MsbnbLinear4bit", inputs, _w4_formats(dx=False)),
    )


@cache
def _linear8bit_dx_op():
    formats = [(act, I8, F32, F32, I64, act, act) for act in (F32, F16)]
    return ops.Custom(
        f"{_path()}:MsbnbLinear8bitDx",
        out_shape=None,
        out_dtype=lambda dy, *rest: rest[-1],
        func_type="aot",
        reg_info=_reg("MsbnbLinear8bitDx", ["dy", "q", "scale", "offset", "meta", "x"], formats),
    )


def _bprop_linear8bit(x, q, scale, offset, bias, meta, out, dout):
    dx = _linear8bit_dx_op()(dout, q, scale, offset, meta, x)
    return (
        dx,
        _zeros_like(q),
        _zeros_like(scale),
        _zeros_like(offset),
        ops.cast(_sum_rows(dout), bias.dtype),
        _zeros_like(meta),
    )


@cache
def _linear8bit_op():
    formats = [(act, I8, F32, F32, F32, I64, act) for act in (F32, F16)]
    return ops.Custom(
        f"{_path()}:MsbnbLinear8bit",
        out_shape=None,
        out_dtype=_same_dtype,
        func_type="aot",
        bprop=_bprop_linear8bit,
        reg_info=_reg("MsbnbLinear8bit", ["x", "q", "scale", "offset", "bias", "meta"], formats),
    )


def _bprop_llm_int8(x, cb, scb, bias, meta, out, dout):
    # bitsandbytes' backward for a frozen int8 weight: dx = dy @ (CB * SCB / 127)
    scale = scb * 7.874015718698502e-3
    dx = _linear8bit_dx_op()(dout, cb, scale, scale, ops.zeros((1,), ms.int64), x)
    return (
        dx,
        _zeros_like(cb),
        _zeros_like(scb),
        ops.cast(_sum_rows(dout), bias.dtype),
        _zeros_like(meta),
    )


@cache
def _llm_int8_op():
    formats = [(act, I8, F32, F32, F32, act) for act in (F32, F16)]
    return ops.Custom(
        f"{_path()}:MsbnbLlmInt8",
        out_shape=None,
        out_dtype=_same_dtype,
        func_type="aot",
        bprop=_bprop_llm_int8,
        reg_info=_reg("MsbnbLlmInt8", ["x", "cb", "scb", "bias", "meta"], formats),
    )


# ---- op cells ---------------------------------------------------------------------------------------------
class _Linear4bitBase(nn.Cell):
    """y = x @ dequant(W)^T + bias for a 4-bit weight [out, in] in bitsandbytes' flat layout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocksize: int,
        nested: bool,
        nested_blocksize: int = 256,
        asymmetric: bool = False,
        has_bias: bool = True,
        compute: str = "float32",
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocksize, self.nested_blocksize = int(blocksize), int(nested_blocksize)
        self.nested, self.asymmetric, self.has_bias = bool(nested), bool(asymmetric), bool(has_bias)
        self.compute = _check_compute(compute)
        if compute == "int8" and (asymmetric or self.in_features % self.blocksize):
            raise ValueError(
                "compute='int8' needs a symmetric code and in_features a multiple of the blocksize, got "
                f"asymmetric={asymmetric}, in_features={in_features}, blocksize={blocksize}"
            )
        flags = (FLAG_NESTED if nested else 0) | (FLAG_ASYM if asymmetric else 0) | (FLAG_BIAS if has_bias else 0)
        flags |= {"float32": 0, "bfloat16": FLAG_BF16, "int8": FLAG_INT8}[compute]
        self.meta = Tensor(np.array([self.in_features, self.blocksize, self.nested_blocksize, flags], np.int64))


class FusedLinear4bit(_Linear4bitBase):
    """The fused dequantize-matmul C++ kernel (codes decoded in registers, no dequantized copy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.op = _linear4bit_op(self.has_bias)

    def construct(self, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset, bias):
        return self.op(
            x, packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset, bias, self.meta
        )


class ReferenceLinear4bit(_Linear4bitBase):
    """Dequantize with MindSpore ops, then MatMul. Its bprop is the kernels' (``_reference_dx``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.in_features * self.out_features
        self.numel = n
        self.n_blocks = -(-n // self.blocksize)

    def _dequantize(self, packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset):
        """(W [out, in] float32, the code indices, the block scales)."""
        p = ops.cast(packed.reshape((-1,)), ms.int32)
        idx = ops.stack((ops.bitwise_right_shift(p, 4), ops.bitwise_and(p, 15)), axis=1).reshape((-1,))
        values = ops.gather(code, idx[: self.numel], 0)
        if self.nested:
            nested_scale = ops.repeat_interleave(nested_absmax, self.nested_blocksize, 0)[: self.n_blocks]
            scale = ops.gather(nested_code, ops.cast(absmax, ms.int32), 0) * nested_scale + nested_offset
        else:
            scale = absmax
        pad = self.n_blocks * self.blocksize - self.numel
        if pad:
            values = ops.concat((values, ops.zeros((pad,), ms.float32)))
        w = values.reshape((self.n_blocks, self.blocksize)) * scale.reshape((-1, 1))
        if self.asymmetric:
            w = w + block_offset.reshape((-1, 1))
        w = w.reshape((-1,))[: self.numel].reshape((self.out_features, self.in_features))
        return w, idx, scale

    def construct(self, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset, bias):
        w, idx, scale = self._dequantize(packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset)
        x32 = ops.cast(x, ms.float32)
        if self.compute == "bfloat16":
            y = ops.matmul(_bf16_round(x32), _bf16_round(w).T)
        elif self.compute == "int8":
            nb = self.in_features // self.blocksize
            levels = ops.clamp(ops.round(ops.gather(code, idx[: self.numel], 0) * 127.0), -127.0, 127.0)
            levels = levels.reshape((self.out_features, self.in_features))
            wscale = scale.reshape((self.out_features, nb)) / 127.0
            x2 = x32.reshape((-1, self.in_features))
            y2, bad = _int8_compute(x2, levels, wscale, nb, self.blocksize)
            y2 = ops.where(ops.broadcast_to(bad, y2.shape), ops.matmul(x2, w.T), y2)
            y = y2.reshape(x.shape[:-1] + (self.out_features,))
        else:
            y = ops.matmul(x32, w.T)
        if self.has_bias:
            y = y + bias
        return ops.cast(y, x.dtype)

    def bprop(self, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset, bias, out, dout):
        w = self._dequantize(packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset)[0]
        dx = _reference_dx(x, w, dout, self.compute)
        dbias = ops.cast(_sum_rows(dout), bias.dtype) if self.has_bias else _zeros_like(bias)
        frozen = (packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset)
        return (dx, *(_zeros_like(t) for t in frozen), dbias)


def _reference_dx(x, w, dout, compute: str):
    """The input gradient the kernels compute: ``dy @ W`` in float32, with dy and W rounded to bfloat16 in the
    bfloat16 mode (products summed in float32), the float gradient in the others (autodiff through the
    int8 mode's rounding would give zero)."""
    g = ops.cast(dout, ms.float32).reshape((-1, w.shape[0]))
    if compute == "bfloat16":
        g, w = _bf16_round(g), _bf16_round(w)
    return ops.cast(ops.matmul(g, w).reshape(x.shape), x.dtype)


class _Linear8bitBase(nn.Cell):
    """y = x @ ((q - offset) * scale)^T + bias for an int8 weight [out, in]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        asymmetric: bool = False,
        has_bias: bool = True,
        compute: str = "float32",
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.asymmetric, self.has_bias = bool(asymmetric), bool(has_bias)
        self.compute = _check_compute(compute)
        if compute == "int8" and asymmetric:
            raise ValueError("compute='int8' needs a symmetric int8 weight (asymmetric=False)")
        mode = {"float32": 0, "bfloat16": 4, "int8": 8}[compute]
        self.meta = Tensor(np.array([(1 if asymmetric else 0) | (2 if has_bias else 0) | mode], np.int64))


class FusedLinear8bit(_Linear8bitBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.op = _linear8bit_op()

    def construct(self, x, q, scale, offset, bias):
        return self.op(x, q, scale, offset, bias, self.meta)


class ReferenceLinear8bit(_Linear8bitBase):
    """Dequantize with MindSpore ops, then MatMul. Its bprop is the kernels' (``_reference_dx``)."""

    def _dequantize(self, q, scale, offset):
        w = ops.cast(q, ms.float32)
        if self.asymmetric:
            w = w - offset.reshape((-1, 1))
        return w * scale.reshape((-1, 1))

    def construct(self, x, q, scale, offset, bias):
        w = self._dequantize(q, scale, offset)
        x32 = ops.cast(x, ms.float32)
        if self.compute == "bfloat16":
            y = ops.matmul(_bf16_round(x32), _bf16_round(w).T)
        elif self.compute == "int8":
            k, blk = self.in_features, I8_BLOCK_INT8
            nb = -(-k // blk)
            levels = ops.cast(q, ms.float32)
            if nb * blk != k:
                levels = ops.concat((levels, ops.zeros((self.out_features, nb * blk - k), ms.float32)), axis=1)
            wscale = ops.broadcast_to(scale.reshape((-1, 1)), (self.out_features, nb))
            x2 = x32.reshape((-1, k))
            y2, bad = _int8_compute(x2, levels, wscale, nb, blk)
            y2 = ops.where(ops.broadcast_to(bad, y2.shape), ops.matmul(x2, w.T), y2)
            y = y2.reshape(x.shape[:-1] + (self.out_features,))
        else:
            y = ops.matmul(x32, w.T)
        if self.has_bias:
            y = y + bias
        return ops.cast(y, x.dtype)

    def bprop(self, x, q, scale, offset, bias, out, dout):
        dx = _reference_dx(x, self._dequantize(q, scale, offset), dout, self.compute)
        dbias = ops.cast(_sum_rows(dout), bias.dtype) if self.has_bias else _zeros_like(bias)
        return dx, _zeros_like(q), _zeros_like(scale), _zeros_like(offset), dbias


class _LlmInt8Base(nn.Cell):
    """LLM.int8(): int8 activations x int8 weights, outlier input columns (|x| >= threshold) in float."""

    def __init__(self, in_features: int, out_features: int, threshold: float, has_bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.threshold, self.has_bias = float(threshold), bool(has_bias)
        self.meta = Tensor(np.array([self.threshold, 1.0 if has_bias else 0.0], np.float32))


class FusedLlmInt8(_LlmInt8Base):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.op = _llm_int8_op()

    def construct(self, x, cb, scb, bias):
        return self.op(x, cb, scb, bias, self.meta)


class ReferenceLlmInt8(_LlmInt8Base):
    """The decomposition with MindSpore ops; the int8 products are summed exactly in float64. Its bprop
    is bitsandbytes' (dx = dy @ dequant(CB)): autodiff through the rounding would give zero."""

    def construct(self, x, cb, scb, bias):
        shape = x.shape
        x_all = ops.cast(x, ms.float32).reshape((-1, self.in_features))
        w = ops.cast(cb, ms.float32) * scb.reshape((-1, 1)) * 7.874015718698502e-3
        # rows with NaN/Inf have no int8 image: they are computed in float (as the fused kernel does) and
        # kept out of the outlier detection and quantization of the other rows
        bad = ops.logical_not(ops.isfinite(x_all)).any(axis=1, keep_dims=True)
        x2 = ops.where(ops.broadcast_to(bad, x_all.shape), ops.zeros_like(x_all), x_all)
        if self.threshold > 0:
            big = ops.abs(x2) >= self.threshold
            cols = big.any(axis=0, keep_dims=True)
            x_in = ops.where(big, ops.zeros_like(x2), x2)
            x_out = ops.where(ops.broadcast_to(cols, x2.shape), x2, ops.zeros_like(x2))
        else:
            cols = None
            x_in = x2
            x_out = None
        sca = ops.amax(ops.abs(x_in), axis=1, keepdims=True)  # amax accepts zero rows; max does not
        factor = ops.where(sca > 0, 127.0 / ops.maximum(sca, 1e-30), ops.zeros_like(sca))
        xq = ops.clamp(ops.round(x_in * factor), -127.0, 127.0)
        if cols is not None:
            xq = ops.where(ops.broadcast_to(cols, xq.shape), ops.zeros_like(xq), xq)
        acc = ops.matmul(ops.cast(xq, ms.float64), ops.cast(cb, ms.float64).T)
        y = ops.cast(acc, ms.float32) * (sca * scb.reshape((1, -1))) * (1.0 / (127.0 * 127.0))
        if x_out is not None:
            y = y + ops.matmul(x_out, w.T)
        y = ops.where(ops.broadcast_to(bad, y.shape), ops.matmul(ops.where(bad, x_all, ops.zeros_like(x_all)), w.T), y)
        if self.has_bias:
            y = y + bias
        return ops.cast(y.reshape(shape[:-1] + (self.out_features,)), x.dtype)

    def bprop(self, x, cb, scb, bias, out, dout):
        w = ops.cast(cb, ms.float32) * scb.reshape((-1, 1)) * 7.874015718698502e-3
        dx = ops.cast(ops.matmul(ops.cast(dout, ms.float32), w), x.dtype)
        return dx, _zeros_like(cb), _zeros_like(scb), ops.cast(_sum_rows(dout), bias.dtype)


# ---- the built-in implementations: op -> backend -> op Cell (immutable) -------------------------------------------
KERNELS: Mapping[str, Mapping[str, type[nn.Cell]]] = MappingProxyType(
    {
        "linear4bit": MappingProxyType({"cpu": FusedLinear4bit, "reference": ReferenceLinear4bit}),
        "linear8bit": MappingProxyType({"cpu": FusedLinear8bit, "reference": ReferenceLinear8bit}),
        "llm_int8": MappingProxyType({"cpu": FusedLlmInt8, "reference": ReferenceLlmInt8}),
    }
)
