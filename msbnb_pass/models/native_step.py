"""The lean decode step without MindSpore's graph executor: the same kernels, called through ctypes.

Why: on the CPU backend MindSpore's executor spends tens of microseconds of bookkeeping around every kernel
launch of a compiled graph (more when the weights just streamed through the caches have evicted its own
data). The lean step of a 4-bit SmolLM2 is ~35 launches, and on the 2-core development VM ~2.9 ms of its
~11 ms went there (README, *Decode speed*). ``NativeStep`` calls the library's exported entry points itself
(the decoder-layer kernel once per layer, then the final norm and the head), with argument arrays built once
per step shape, so a step costs a few microseconds per call outside the kernels.

It computes exactly what the compiled lean step computes: the same kernels, in the same order, on the same
inputs (the network's own parameters, read in place through zero-copy numpy views), so the same bits; the
tests compare the two. It writes the decoder's cache Parameters in place (no second copy of the caches)
and needs a decoder whose layers are one kernel each (every projection 4-bit: :class:`~msbnb_pass.models.generation.CachedDecoder` with ``fused``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..errors import MsbnbError
from ..kernels import _lib
from ..kernels.decode_ops import w4_args

_KernelFn = Any  # a ctypes function of the library (int fn(nparam, params, ndims, shapes, dtypes, void*, void*))


class NativeStepError(MsbnbError):
    """The decoder cannot run natively (names why and what is accepted), or a kernel failed."""


def _view(t: Tensor, what: str, sources: list[tuple[Tensor, int]]) -> np.ndarray:
    """The host memory of a MindSpore tensor as a C-contiguous numpy array, without a copy; the tensor and
    its address are recorded in ``sources`` (see :meth:`NativeStep.current`)."""
    a = t.asnumpy()
    if not a.flags.c_contiguous or a.ctypes.data != t.data_ptr():
        raise NativeStepError(f"{what}: not a contiguous tensor in host memory, which the native step reads in place")
    sources.append((t, a.ctypes.data))
    return a


class _Call:
    """The argument arrays of one kernel call over numpy arrays (kept alive here): the pointers, ranks,
    shapes and dtype names the library's entry points take."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        n = len(arrays)
        self.n = n
        self.params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        self.ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        self._dims = [(ctypes.c_int64 * max(1, a.ndim))(*a.shape) for a in arrays]
        i64p = ctypes.POINTER(ctypes.c_int64)
        self.shapes = (i64p * n)(*[ctypes.cast(d, i64p) for d in self._dims])
        self.dtypes = (ctypes.c_char_p * n)(*[str(a.dtype).encode() for a in arrays])

    def set(self, i: int, array: np.ndarray) -> None:
        """Replace argument i by an array of the same shape and dtype (another buffer)."""
        old = self.arrays[i]
        if array.shape != old.shape or array.dtype != old.dtype or not array.flags.c_contiguous:
            raise NativeStepError(
                f"native decode step: argument {i} must stay a contiguous {old.dtype} array of shape {old.shape}, "
                f"got {array.dtype} {array.shape}"
            )
        self.arrays[i] = array
        self.params[i] = array.ctypes.data

    def run(self, fn: _KernelFn, what: str, error: Any) -> None:
        """Call the entry point; a nonzero return raises with the library's message (``error()``)."""
        rc = fn(self.n, self.params, self.ndims, self.shapes, self.dtypes, None, None)
        if rc:
            msg = error()
            raise NativeStepError(f"native decode step, {what}: {msg.decode() if msg else f'error {rc}'}")


class NativeStep:
    """``step(ids [B,T], positions [B,T], mask [B,T,S], slots [B,KV,T,3]) -> logits [B, vocab]`` (numpy), the
    compiled lean decoder's step run through ctypes, on the decoder's caches. ``reset()`` clears them."""

    def __init__(self, dec: Any):
        lib = _lib.load()
        if lib is None:
            raise NativeStepError("the native decode step needs the msbnb_pass kernel library, which is not available")
        if not (dec.lean and dec.fused):
            raise NativeStepError(
                "the native decode step needs every projection of every layer to be a Linear4bit the fused kernel "
                "runs (float32, bfloat16 or int8 compute, no adapters); this network's layers are not"
            )
        if dec.quantized_head is not None or dec.head_kind not in ("q8", "f32", "w4"):
            raise NativeStepError(
                f"the native decode step computes a float32 head (tied or lm_head, lossless int8 codes included) or a "
                f"Linear4bit head, not quantized_head={dec.quantized_head!r} / head kind {dec.head_kind!r}"
            )
        self._lib = lib
        self._sources: list[tuple[Tensor, int]] = []
        src = self._sources
        self._decode_error = lib.msbnb_decode_last_error
        self._decode_error.restype = ctypes.c_char_p
        self._api_error = lib.msbnb_last_error
        self._fns = {name: getattr(lib, name) for name in ("MsbnbDecodeLayer4bit", "MsbnbRmsNorm")}
        lm = dec.lm
        model = lm.model
        layers = model.layers
        self.batch, self.max_len, self.n_kv, self.head_dim = dec.batch, dec.max_len, dec.n_kv, dec.head_dim
        self.n_layers = dec.n_layers
        self.hidden = int(lm.config.hidden_size)
        embed = model.embed_tokens
        table = getattr(embed, "weight", None)
        self._table = _view(table, "token embedding", src) if table is not None and table.dtype == ms.float32 else None
        self._embed = embed  # any other embedding cell runs through MindSpore (one launch per step)
        self._cos = _view(model.cos_table, "RoPE cos table", src)
        self._sin = _view(model.sin_table, "RoPE sin table", src)
        self._meta = np.array([dec.n_heads, dec.n_kv], np.int64)
        self._scale = np.array([dec.scale], np.float32)
        self._eps = np.array([float(lm.config.rms_norm_eps)], np.float32)
        self._first_norm = _view(layers[0].input_layernorm.weight, "layer 0 input norm", src)
        self._layers = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            nxt = model.norm.weight if i == self.n_layers - 1 else layers[i + 1].input_layernorm.weight
            weights = []
            for name, cell in (
                ("q_proj", attn.q_proj),
                ("k_proj", attn.k_proj),
                ("v_proj", attn.v_proj),
                ("o_proj", attn.o_proj),
                ("gate_proj", mlp.gate_proj),
                ("up_proj", mlp.up_proj),
                ("down_proj", mlp.down_proj),
            ):
                weights += [_view(t, f"layers.{i}.{name}", src) for t in w4_args(cell)]
            post = _view(layer.post_attention_layernorm.weight, f"layers.{i}.post_attention_layernorm", src)
            self._layers.append((post, _view(nxt, f"layers.{i + 1}.input_layernorm / norm", src), weights))
        if dec.head_kind == "q8":
            self._head = [_view(dec.head_q8, "head codes", src), _view(dec.head_q8_scale, "head scales", src)]
            self._head_fn = lib.MsbnbLinearQ8
        elif dec.head_kind == "f32":
            w = model.embed_tokens.weight if lm.tied else lm.lm_head.weight
            self._head = [_view(w, "output head", src)]
            self._head_fn = lib.MsbnbLinearF32
        else:
            self._head = [_view(t, "lm_head", src) for t in w4_args(lm.lm_head)]
            self._head_fn = lib.MsbnbLinear4bitMulti
        self._vocab = int(self._head[0].shape[0]) if dec.head_kind != "w4" else int(lm.lm_head.out_features)
        self._dec = dec
        self._plans: dict[int, dict[str, Any]] = {}
        self._bind_caches()

    def current(self) -> bool:
        """Whether every tensor read in place still has the memory it had when this step was built (a
        ``set_data``, e.g. ``load_param_into_net``, gives a parameter new memory: the step must be rebuilt)."""
        return all(t.data_ptr() == addr for t, addr in self._sources)

    def _bind_caches(self) -> None:
        """Use the decoder's cache Parameters as this step's caches (their host memory, written in place: no
        second copy), and point the built argument arrays at them."""
        src: list[tuple[Tensor, int]] = []
        self._k = [_view(c, f"k_cache.{i}", src) for i, c in enumerate(self._dec.k_cache)]
        self._v = [_view(c, f"v_cache.{i}", src) for i, c in enumerate(self._dec.v_cache)]
        self._cache_sources = src
        for plan in self._plans.values():
            for i, call in enumerate(plan["calls"]):
                call.set(5, self._k[i])
                call.set(6, self._v[i])

    def reset(self) -> None:
        """Clear the caches for a new batch of sequences (after rebinding them if the decoder gave its cache
        Parameters new memory, as it does when it is reused)."""
        if not all(t.data_ptr() == addr for t, addr in self._cache_sources):
            self._bind_caches()
        for c in self._k + self._v:
            c.fill(0.0)

    def _plan(self, t: int) -> dict[str, Any]:
        """The buffers and argument arrays of a step of t positions (built once per t, reused)."""
        plan = self._plans.get(t)
        if plan is not None:
            return plan
        if len(self._plans) >= 2:  # a prefill length and the decode step; drop an older prefill's
            self._plans.pop(next(k for k in self._plans if k != 1))
        b, h, d, s = self.batch, self.hidden, self.head_dim, self.max_len
        f32 = np.float32
        xs = [np.zeros((b, t, h), f32) for _ in range(2)]
        norm = [np.zeros((b, t, h), f32) for _ in range(2)]
        cos, sin = np.zeros((b, t, d), f32), np.zeros((b, t, d), f32)
        mask = np.zeros((b, t, s), f32)
        slots = np.zeros((b, self.n_kv, t, 3), np.int32)
        last = np.zeros((b, 1, h), f32)
        logits = np.zeros((b, 1, self._vocab), f32)
        first = _Call([xs[0], self._first_norm, self._eps, norm[0]])
        calls = []
        for i, (post, nxt, weights) in enumerate(self._layers):
            j, k = i % 2, (i + 1) % 2
            args = [xs[j], norm[j], cos, sin, self._meta, self._k[i], self._v[i], slots, mask, self._scale]
            calls.append(_Call(args + [post, nxt, self._eps] + weights + [xs[k], norm[k]]))
        head = _Call([last] + self._head + [logits])
        plan = dict(x=xs[0], cos=cos, sin=sin, mask=mask, slots=slots, last=last, logits=logits, first=first)
        plan.update(calls=calls, out=norm[self.n_layers % 2], head=head)
        self._plans[t] = plan
        return plan

    def __call__(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, slots: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        if b != self.batch or mask.shape != (b, t, self.max_len) or slots.shape != (b, self.n_kv, t, 3):
            raise NativeStepError(
                f"native decode step: ids {ids.shape}, mask {mask.shape}, slots {slots.shape} do not match the "
                f"decoder's batch {self.batch}, {self.n_kv} kv heads and {self.max_len} cache slots"
            )
        p = self._plan(t)
        if self._table is not None:
            np.take(self._table, ids, axis=0, out=p["x"])
        else:
            x = self._embed(Tensor(ids)).asnumpy()
            if x.dtype != np.float32:
                raise NativeStepError(f"native decode step: the token embedding gives {x.dtype}, float32 expected")
            p["x"][...] = x
        np.take(self._cos, positions, axis=0, out=p["cos"])
        np.take(self._sin, positions, axis=0, out=p["sin"])
        p["mask"][...] = mask
        p["slots"][...] = slots
        fns, derr = self._fns, self._decode_error
        p["first"].run(fns["MsbnbRmsNorm"], "input norm", derr)
        layer_fn = fns["MsbnbDecodeLayer4bit"]
        for i, call in enumerate(p["calls"]):
            call.run(layer_fn, f"layer {i}", derr)
        p["last"][:, 0, :] = p["out"][:, t - 1, :]
        p["head"].run(
            self._head_fn,
            "output head",
            derr if self._head_fn is not self._lib.MsbnbLinear4bitMulti else self._api_error,
        )
        return p["logits"].reshape(b, -1).copy()
