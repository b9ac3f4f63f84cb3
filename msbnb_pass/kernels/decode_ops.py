"""The decode-step kernels (csrc/decode.cc and the fused 4-bit projection in csrc/api.cc) as MindSpore ops.

Each factory returns one ``ops.Custom(func_type="aot")`` primitive (cached: one per process). Their output
shapes are computed in Python at graph compile time (the decode graphs have static shapes), so no C++
shape inference runs per launch. They are used by ``msbnb_pass.models.generation`` when the kernel
library is available; ``available()`` says whether it is.

* ``rms_norm(x, weight, eps[1]) -> y``; ``add_rms_norm(x, h, weight, eps[1]) -> (x + h, rms_norm(x + h))``
* ``rope_split(qkv [B,T,(H+2KV)*D], cos [B,T,D], sin [B,T,D], meta int64 [H, KV]) -> q [B,H,T,D], k, v
  [B,KV,T,D]`` (q and k rotated, rotate-half layout)
* ``cache_attention(q [B,H,T,D], k_cache, v_cache [B,KV,S,D], mask [B,T,S], scale[1]) -> [B,T,H*D]``
* ``swiglu(gu [..., 2I]) -> silu(gu[..., :I]) * gu[..., I:]``
* ``linear_f32(n_weights)(x, W_1, ..., W_g) -> x @ [W_1; ...; W_g]^T`` (float32 weights, no bias)
* ``linear4bit_multi(n)(x, 9 tensors per projection...) -> the projections' outputs concatenated``
* ``linear_q8(x [..., K], q int8 [N, K], d [N, K/32]) -> x @ (q * d)^T`` (a float32 weight held losslessly
  as int8 codes and one scale per 32 weights, decoded exactly; float32 products and sums)
* ``decode_layer_4bit(x, a, cos, sin, meta, k_cache, v_cache, slots, mask, scale, post_norm, next_norm, eps,
  9 tensors for each of q, k, v, o, gate, up, down) -> (x', a')``: a whole decoder layer whose projections
  are 4-bit (any compute mode) in one launch: the kernels above in the per-op step's order (same bits),
  the caches written in place
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mindspore as ms
from mindspore import ops

from . import _lib


def available() -> bool:
    """Whether the kernel library (with the decode kernels) is loaded."""
    return _lib.available()


def _fn(name: str) -> str:
    path = _lib.library_path()
    if path is None or not _lib.available():
        raise RuntimeError("the decode kernels need the msbnb_pass kernel library, which is not available")
    return f"{path}:{name}"


def _first_shape(x, *_):
    return x


def _f32(*_):
    return ms.float32


@cache
def rms_norm():
    return ops.Custom(_fn("MsbnbRmsNorm"), out_shape=_first_shape, out_dtype=_f32, func_type="aot")


def _pair_shape(x, *_):
    return (x, x)


def _pair_dtype(*_):
    return (ms.float32, ms.float32)


@cache
def add_rms_norm():
    return ops.Custom(_fn("MsbnbAddRmsNorm"), out_shape=_pair_shape, out_dtype=_pair_dtype, func_type="aot")


@cache
def rope_split(heads: int, kv_heads: int):
    """The RoPE/split op for a fixed head layout (the shapes of its outputs depend on it)."""
    h, kv = int(heads), int(kv_heads)

    def shape(qkv, cos, sin, meta):
        b, t, _ = qkv
        d = cos[-1]
        return ([b, h, t, d], [b, kv, t, d], [b, kv, t, d])

    def dtype(*_):
        return (ms.float32, ms.float32, ms.float32)

    return ops.Custom(_fn("MsbnbRopeSplit"), out_shape=shape, out_dtype=dtype, func_type="aot")


def _attention_shape(q, k, v, mask, scale):
    b, h, t, d = q
    return [b, t, h * d]


@cache
def cache_attention():
    return ops.Custom(_fn("MsbnbCacheAttention"), out_shape=_attention_shape, out_dtype=_f32, func_type="aot")


def _swiglu_shape(gu):
    return list(gu[:-1]) + [gu[-1] // 2]


@cache
def swiglu():
    return ops.Custom(_fn("MsbnbSwiGlu"), out_shape=_swiglu_shape, out_dtype=_f32, func_type="aot")


def _linear_f32_shape(x, *weights):
    return list(x[:-1]) + [sum(w[0] for w in weights)]


@cache
def linear_f32(n_weights: int):
    """``x @ [W_1; ...; W_n]^T`` for ``n_weights`` float32 weights ``[N_i, K]`` (1 to 8)."""
    if not 1 <= n_weights <= 8:
        raise ValueError(f"linear_f32 takes 1 to 8 weights, got {n_weights}")
    return ops.Custom(_fn("MsbnbLinearF32"), out_shape=_linear_f32_shape, out_dtype=_f32, func_type="aot")


def _linear4bit_multi_shape(x, *rest):
    return list(x[:-1]) + [sum(rest[9 * i + 7][0] for i in range(len(rest) // 9))]


@cache
def linear4bit_multi(n_projections: int):
    """Projections of one input by ``n_projections`` 4-bit weights (each in its own compute mode: float32, bfloat16 or int8),
    outputs concatenated.
    Per projection: packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, block_offset,
    bias [N_i] and meta, as ``MsbnbLinear4bit`` takes them."""
    if not 1 <= n_projections <= 8:
        raise ValueError(f"linear4bit_multi takes 1 to 8 projections, got {n_projections}")
    return ops.Custom(_fn("MsbnbLinear4bitMulti"), out_shape=_linear4bit_multi_shape, out_dtype=_f32, func_type="aot")


def w4_args(cell: Any) -> tuple:
    """The tensors ``linear4bit_multi`` (and the decoder-layer kernel) take for one ``Linear4bit`` layer (typed
    loosely: this layer sits below ``msbnb_pass.nn``), in their order."""
    return (
        cell.weight,
        cell.weight_absmax,
        cell.weight_quant_map,
        cell.weight_nested_absmax,
        cell.weight_nested_quant_map,
        cell.weight_nested_offset,
        cell.weight_block_offset,
        cell._bias(),
        cell.kernel.meta,
    )


def _linear_q8_shape(x, q, d):
    return list(x[:-1]) + [q[0]]


@cache
def linear_q8():
    return ops.Custom(_fn("MsbnbLinearQ8"), out_shape=_linear_q8_shape, out_dtype=_f32, func_type="aot")


@cache
def decode_layer_4bit():
    """One decoder layer of the lean step in one launch (see the module docstring)."""
    return ops.Custom(_fn("MsbnbDecodeLayer4bit"), out_shape=_pair_shape, out_dtype=_pair_dtype, func_type="aot")
