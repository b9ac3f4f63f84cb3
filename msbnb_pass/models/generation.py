"""Text generation for the LLaMA decoder: a static-shape KV cache, one compiled graph per step shape.

``generate`` (also ``LlamaForCausalLM.generate``) runs the prompt through the network once (prefill, all
prompt positions in one batched step) and then one token per step (decode). Keys and values live in
preallocated caches, one pair of Parameters ``[batch, kv_heads, max_len, head_dim]`` per layer, written in
place (``ScatterNdUpdate``) at the step's slots, so every decode step has the same input shapes and runs
the same compiled graph (GRAPH_MODE, or ``ms.jit`` under PyNative); nothing is recompiled per step.

Batches of prompts of different lengths are left-padded: ``attention_mask`` (1 = token, 0 = padding)
hides the padding from every query, and RoPE positions count the real tokens only, so each prompt sees
exactly what it would see alone. The cached forward reuses the network's own layers (whatever cells the
pass or a loader put there: quantized layers included), so the network itself stays cache-free.

Sampling (temperature, top-k, top-p) runs on the host in numpy with a seeded generator: reproducible.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..errors import MsbnbError
from ..kernels import decode_ops, get_backend
from ..nn import Linear4bit, Linear8bit
from .native_step import NativeStep, NativeStepError

logger = logging.getLogger(__name__)

_MASKED = np.float32(-1e30)  # added to masked attention scores: exp() underflows to exactly 0
_SLOT_ROUND = 64  # cache lengths are rounded up to a multiple of this, so nearby lengths share one graph


class GenerationError(MsbnbError):
    """An argument of ``generate`` / ``apply_chat_template`` is unusable (names it, its value and what is
    accepted)."""


def _rotate_half(x, half: int):
    x1, x2 = ops.split(x, half, -1)
    return ops.cat((-x2, x1), -1)


class CachedDecoder(nn.Cell):
    """The decoder of a ``LlamaForCausalLM`` with a KV cache: ``construct(ids [B,T], positions [B,T],
    mask [B,T,S] additive, slots [B,KV,T,3]) -> logits of the last position [B, vocab]``.

    It holds no weights of its own: it calls the network's cells (embedding, norms, projections, MLP,
    head), and owns only the caches (``k_cache.i`` / ``v_cache.i``, ``[B, kv_heads, S, head_dim]``).

    ``lean`` (default: when the C++ kernel backend is in use) computes a step with 11 ops per layer
    instead of about 50: RMSNorm fused with the residual add before it, RoPE fused with the split of the
    q/k/v output into heads, attention over the cache (grouped-query heads read their key/value head in
    place, masked slots skipped), SwiGLU, each one aot kernel (``msbnb_pass.kernels.decode_ops``); the
    q/k/v and the gate/up projections each one kernel call reading the layers' own weights (4-bit layers:
    bit-identical to calling them one by one; float32 layers at T = 1: one float32 kernel). A float32
    head (tied embedding or ``lm_head``) whose weights are int8 codes times one scale per 32 without loss
    (a GGUF Q8_0 embedding, or its dequantized twin: see :func:`lossless_q8`) is streamed in that form, a
    quarter of the bytes, decoded exactly in the kernel (a decode-time copy of ~1.1 bytes per weight);
    any other float32 head by the float32 kernel. Otherwise every step is plain MindSpore ops."""

    def __init__(
        self,
        lm: nn.Cell,
        batch: int,
        max_len: int,
        lean: bool | None = None,
        quantized_head: str | None = None,
        fuse_layers: bool = True,
    ):
        super().__init__()
        cfg = lm.config
        table = getattr(lm.model.embed_tokens, "weight", None)
        if lm.tied and (table is None or table.dtype not in (ms.float32, ms.float16)):
            raise GenerationError(
                f"the output head is tied to the token embedding, which is a {type(lm.model.embed_tokens).__name__} "
                "without a float table; quantize an untied model's embedding (the pass keeps a tied one)"
            )
        self.lm = lm
        # the tensors this decoder keeps a derived copy of (the head's int8 forms), with their addresses then
        self._derived_from: list[tuple[Tensor, int]] = []
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.n_rep = self.n_heads // self.n_kv
        self.head_dim = int(cfg.head_dim)
        self.half = self.head_dim // 2
        self.scale = float(self.head_dim) ** -0.5
        self.batch = int(batch)
        self.max_len = int(max_len)
        shape = (self.batch, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = ParameterTuple(
            [
                Parameter(Tensor(np.zeros(shape, np.float32)), name=f"kv_cache.k.{i}", requires_grad=False)
                for i in range(self.n_layers)
            ]
        )
        self.v_cache = ParameterTuple(
            [
                Parameter(Tensor(np.zeros(shape, np.float32)), name=f"kv_cache.v.{i}", requires_grad=False)
                for i in range(self.n_layers)
            ]
        )
        self.scatter = ops.ScatterNdUpdate()
        self.scores_mm = ops.BatchMatMul(transpose_b=True)
        self.probs_mm = ops.BatchMatMul()
        if lean is None:
            lean = decode_ops.available() and get_backend() == "cpu"
        if lean and not decode_ops.available():
            raise GenerationError("decode_kernels=True needs the msbnb_pass kernel library, which is not available")
        self.lean = bool(lean)
        self.fuse_layers = bool(fuse_layers)
        self.fused = False  # decided by _plan_lean: one kernel per decoder layer
        if self.lean:
            self._plan_lean(lm)
        self.quantized_head = _check_head(quantized_head)
        if quantized_head is not None:
            self.head_q = _int8_head(lm)
            source = lm.model.embed_tokens.weight if lm.tied else lm.lm_head.weight
            self._derived_from.append((source, source.data_ptr()))

    def derived_current(self) -> bool:
        """Whether the head weights this decoder copied (int8-coded or int8 forms) still have the memory they had.
        A ``set_data`` (``load_param_into_net``, a reloaded checkpoint) gives them new memory and makes the copies
        stale; weights changed in place (training the head inside a graph) keep their memory and are not seen."""
        return all(t.data_ptr() == addr for t, addr in self._derived_from)

    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        # MindSpore sets the compile phase on every sub-cell at every call of a compiled cell: the whole network
        # (~600 cells for SmolLM2) walked through Cell.__setattr__, ~3 ms of a ~15 ms decode step. Only
        # parallel strategies read a sub-cell's phase; the decoder keeps its own.
        object.__setattr__(self, "_compile_phase", value)

    # ---- the lean step: one aot kernel per norm, RoPE, attention and SwiGLU, fused projections -----------------
    def _plan_lean(self, lm: nn.Cell) -> None:
        """Decide, for each group of projections that read the same input, how the lean step computes it:
        "w4" (one fused 4-bit kernel call for the whole group), "f32" (one float32 kernel call over the
        group's weights, T = 1 only) or "cells" (each layer's own cell, outputs concatenated). The weights
        are not copied: the kernels read the layers' own parameters, so the network (and what
        ``save_pretrained`` writes) keeps one tensor per projection."""
        layers = lm.model.layers
        groups = {
            "qkv": [(ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj) for ly in layers],
            "o": [(ly.self_attn.o_proj,) for ly in layers],
            "gate_up": [(ly.mlp.gate_proj, ly.mlp.up_proj) for ly in layers],
            "down": [(ly.mlp.down_proj,) for ly in layers],
        }
        kinds = {name: _group_kind(cells) for name, cells in groups.items()}
        self.kind_qkv, self.kind_o, self.kind_gate_up, self.kind_down = (kinds[k] for k in groups)
        self.head_kind = _group_kind([(lm.lm_head,)]) if not lm.tied else "f32"
        if self.head_kind == "f32":
            head = lm.model.embed_tokens.weight if lm.tied else lm.lm_head.weight
            q8 = lossless_q8(head.asnumpy())
            if q8 is not None:  # the same float32 weights in a quarter of the bytes: exact, and faster
                self._derived_from.append((head, head.data_ptr()))
                self.head_kind = "q8"
                self.head_q8 = Parameter(Tensor(q8[0]), name="head_q8.codes", requires_grad=False)
                self.head_q8_scale = Parameter(Tensor(q8[1]), name="head_q8.scales", requires_grad=False)
                self.q8_op = decode_ops.linear_q8()
        self.rope_op = decode_ops.rope_split(self.n_heads, self.n_kv)
        self.rope_meta = Tensor(np.array([self.n_heads, self.n_kv], np.int64))
        self.attention_op = decode_ops.cache_attention()
        self.scale_t = Tensor(np.array([self.scale], np.float32))
        self.rms_op = decode_ops.rms_norm()
        self.add_rms_op = decode_ops.add_rms_norm()
        self.swiglu_op = decode_ops.swiglu()
        self.eps_t = Tensor(np.array([float(lm.config.rms_norm_eps)], np.float32))
        self.f32_1, self.f32_2, self.f32_3 = (decode_ops.linear_f32(n) for n in (1, 2, 3))
        self.w4_1, self.w4_2, self.w4_3 = (decode_ops.linear4bit_multi(n) for n in (1, 2, 3))
        # every projection 4-bit (any compute mode): the whole layer is one kernel (same kernels, same order)
        self.fused = self.fuse_layers and all(k == "w4" for k in kinds.values())
        if self.fused:
            self.layer_op = decode_ops.decode_layer_4bit()
        logger.debug(
            "lean decode step: projections %s, head %s, one kernel per layer: %s", kinds, self.head_kind, self.fused
        )

    def _project(self, kind: str, cells, x, t: int):
        """The projections ``cells`` of x, concatenated along the last axis."""
        n = len(cells)
        if kind == "w4":
            args = ()
            for c in cells:
                args = args + decode_ops.w4_args(c)
            if n == 1:
                return self.w4_1(x, *args)
            if n == 2:
                return self.w4_2(x, *args)
            return self.w4_3(x, *args)
        if kind == "f32" and t == 1:
            weights = ()
            for c in cells:
                weights = weights + (c.weight,)
            if n == 1:
                return self.f32_1(x, *weights)
            if n == 2:
                return self.f32_2(x, *weights)
            return self.f32_3(x, *weights)
        if n == 1:
            return cells[0](x)
        outs = ()
        for c in cells:
            outs = outs + (c(x),)
        return ops.concat(outs, -1)

    def _lean_step(self, ids, positions, mask, slots):
        b, t = ids.shape
        model = self.lm.model
        x = model.embed_tokens(ids)
        cos = ops.gather(model.cos_table, positions, 0)
        sin = ops.gather(model.sin_table, positions, 0)
        layers = model.layers
        a = self.rms_op(x, layers[0].input_layernorm.weight, self.eps_t)
        for i in range(self.n_layers):
            layer = layers[i]
            attn = layer.self_attn
            norm = model.norm.weight if i == self.n_layers - 1 else layers[i + 1].input_layernorm.weight
            if self.fused:
                mlp = layer.mlp
                args = ()
                for c in (
                    attn.q_proj,
                    attn.k_proj,
                    attn.v_proj,
                    attn.o_proj,
                    mlp.gate_proj,
                    mlp.up_proj,
                    mlp.down_proj,
                ):
                    args = args + decode_ops.w4_args(c)
                x, a = self.layer_op(
                    x,
                    a,
                    cos,
                    sin,
                    self.rope_meta,
                    self.k_cache[i],
                    self.v_cache[i],
                    slots,
                    mask,
                    self.scale_t,
                    layer.post_attention_layernorm.weight,
                    norm,
                    self.eps_t,
                    *args,
                )
                continue
            qkv = self._project(self.kind_qkv, (attn.q_proj, attn.k_proj, attn.v_proj), a, t)
            q, k, v = self.rope_op(qkv, cos, sin, self.rope_meta)
            self.scatter(self.k_cache[i], slots, k)
            self.scatter(self.v_cache[i], slots, v)
            o = self.attention_op(q, self.k_cache[i], self.v_cache[i], mask, self.scale_t)
            h = self._project(self.kind_o, (attn.o_proj,), o, t)
            x, a = self.add_rms_op(x, h, layer.post_attention_layernorm.weight, self.eps_t)
            mlp = layer.mlp
            gu = self._project(self.kind_gate_up, (mlp.gate_proj, mlp.up_proj), a, t)
            h = self._project(self.kind_down, (mlp.down_proj,), self.swiglu_op(gu), t)
            x, a = self.add_rms_op(x, h, norm, self.eps_t)
        last = a[:, t - 1 :, :]
        if self.quantized_head is not None:
            logits = self.head_q(last)
        elif self.head_kind == "q8":
            logits = self.q8_op(last, self.head_q8, self.head_q8_scale)
        elif self.lm.tied:
            logits = self.f32_1(last, model.embed_tokens.weight)
        else:
            logits = self._project(self.head_kind, (self.lm.lm_head,), last, 1)
        return logits.reshape(b, -1)

    def rope(self, q, k, cos, sin):
        """RoPE of q ``[B, heads, T, D]`` and k ``[B, kv_heads, T, D]`` (rotate-half layout)."""
        q = q * cos + _rotate_half(q, self.half) * sin
        k = k * cos + _rotate_half(k, self.half) * sin
        return q, k

    def attend(self, q, k, v, mask, k_cache, v_cache, slots):
        """Write k, v ``[B, kv_heads, T, D]`` into the caches at ``slots``; attention of q over the caches."""
        b, _, t, hd = q.shape
        self.scatter(k_cache, slots, k)
        self.scatter(v_cache, slots, v)
        s = self.max_len
        # query head j uses key/value head j // n_rep: fold the n_rep heads of a group into the rows
        q = q.reshape(b, self.n_kv, self.n_rep * t, hd)
        scores = self.scores_mm(q, k_cache) * self.scale
        scores = scores.reshape(b, self.n_kv, self.n_rep, t, s) + mask
        probs = ops.softmax(scores.reshape(b, self.n_kv, self.n_rep * t, s), -1)
        return self.probs_mm(probs, v_cache).reshape(b, self.n_heads, t, hd)

    def _heads(self, y, b, t, n):
        if t == 1:  # [B, 1, n, D] -> [B, n, 1, D] is a reshape: no transpose (static shape, decided at compile)
            return y.reshape(b, n, 1, self.head_dim)
        return y.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)

    def _attention(self, attn, x, cos, sin, mask, k_cache, v_cache, slots):
        b, t, _ = x.shape
        q = self._heads(attn.q_proj(x), b, t, self.n_heads)
        k = self._heads(attn.k_proj(x), b, t, self.n_kv)
        v = self._heads(attn.v_proj(x), b, t, self.n_kv)
        q, k = self.rope(q, k, cos, sin)
        out = self.attend(q, k, v, mask, k_cache, v_cache, slots)
        if t == 1:
            out = out.reshape(b, 1, self.n_heads * self.head_dim)
        else:
            out = out.transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim)
        return attn.o_proj(out)

    @ms.jit
    def construct(self, ids, positions, mask, slots):
        if self.lean:
            return self._lean_step(ids, positions, mask, slots)
        b, t = ids.shape
        model = self.lm.model
        x = model.embed_tokens(ids)
        cos = ops.gather(model.cos_table, positions, 0).reshape(b, 1, t, self.head_dim)
        sin = ops.gather(model.sin_table, positions, 0).reshape(b, 1, t, self.head_dim)
        mask = mask.reshape(b, 1, 1, t, self.max_len)
        for i in range(self.n_layers):
            layer = model.layers[i]
            h = self._attention(
                layer.self_attn, layer.input_layernorm(x), cos, sin, mask, self.k_cache[i], self.v_cache[i], slots
            )
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        h = model.norm(x[:, t - 1 :, :])
        if self.quantized_head is not None:
            return self.head_q(h).reshape(b, -1)
        return self.lm.head(h).reshape(b, -1)


def lossless_q8(w: np.ndarray, block: int = 32, rows: int = 4096) -> tuple[np.ndarray, np.ndarray] | None:
    """``(q int8 [N, K], d float32 [N, K / block])`` with ``q * d == w`` exactly in float32 for every
    weight, or None when ``w`` [N, K] has no such form (it has one when it was stored as GGUF Q8_0, or
    is that storage's dequantized float32 twin: an fp16 scale times an int8 code is exact in float32).
    Each block's scale is its largest magnitude / 127 (Q8_0's rule), which recovers the stored scale.
    Checked ``rows`` rows at a time (bounded temporary memory; a float matrix fails on its first rows)."""
    w = np.asarray(w)
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] % block:
        return None
    n, k = w.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, k // block), np.float32)
    for r0 in range(0, n, rows):
        v = w[r0 : r0 + rows].reshape(-1, k // block, block)
        if not np.isfinite(v).all():
            return None
        d = (np.abs(v).max(axis=-1) / np.float32(127)).astype(np.float32)
        q = v / np.where(d > 0, d, np.float32(1))[..., None]
        qi = np.rint(q)
        if not (np.abs(qi) <= 127).all() or not np.array_equal(qi, q):
            return None
        qi = qi.astype(np.int8)
        if not np.array_equal(qi.astype(np.float32) * d[..., None], v):
            return None
        codes[r0 : r0 + rows] = qi.reshape(-1, k)
        scales[r0 : r0 + rows] = d
    return codes, scales


def _check_head(quantized_head: str | None) -> str | None:
    if quantized_head not in (None, "int8"):
        raise GenerationError(f"quantized_head must be None (the exact head) or 'int8', got {quantized_head!r}")
    return quantized_head


def _int8_head(lm: nn.Cell) -> nn.Cell:
    """An int8 copy (bitsandbytes' row-wise absmax format) of the float32 output head, for the opt-in
    ``quantized_head='int8'``: the network keeps its float head (and the tied embedding)."""
    if lm.tied:
        w = lm.model.embed_tokens.weight
    elif type(lm.lm_head) is nn.Dense and not lm.lm_head.has_bias:
        w = lm.lm_head.weight
    else:
        raise GenerationError(
            f"quantized_head='int8' needs a float head without bias (a tied embedding or an nn.Dense lm_head), "
            f"got {type(lm.lm_head).__name__}"
        )
    w = w.asnumpy().astype(np.float32)
    head = Linear8bit(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, weight=w, layer_name="lm_head")
    head.name_parameters("head_int8.")
    return head


def _is_w4(cell: nn.Cell) -> bool:
    """A Linear4bit the fused multi-projection kernel computes exactly as the layer itself does: the C++
    backend, a compute mode that takes float32 input unchanged (float32, bfloat16, int8), no activation."""
    return (
        type(cell) is Linear4bit  # not a subclass, which may compute more (adapters) in its construct
        and type(cell.kernel).__name__ == "FusedLinear4bit"
        and cell.compute_dtype_name in ("float32", "bfloat16", "int8")  # (a float32 input is passed unchanged)
        and not cell.activation_flag
    )


def _is_f32(cell: nn.Cell) -> bool:
    """A float32 ``nn.Dense`` without bias or activation (what the float32 kernel computes)."""
    return (
        type(cell) is nn.Dense
        and not cell.has_bias
        and not cell.activation_flag
        and cell.weight.dtype == ms.float32
        and len(cell.weight.shape) == 2
    )


def _group_kind(groups: Sequence[tuple[nn.Cell, ...]]) -> str:
    """ "w4" / "f32" when every cell of every group qualifies (and the groups' in_features agree), else
    "cells"."""
    cells = [c for g in groups for c in g]
    if all(_is_w4(c) for c in cells):
        return "w4"
    if all(_is_f32(c) for c in cells):
        return "f32"
    return "cells"


def _as_ids(input_ids: Any) -> np.ndarray:
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.asnumpy()
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(
            f"input_ids must be integer token ids of shape [batch, length] (or [length]), both >= 1; got "
            f"dtype {ids.dtype} and shape {list(ids.shape)}"
        )
    return ids.astype(np.int32)


def _as_mask(attention_mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int32)
    if isinstance(attention_mask, Tensor):
        attention_mask = attention_mask.asnumpy()
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise GenerationError(f"attention_mask must have input_ids' shape {list(shape)}, got {list(mask.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise GenerationError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.astype(np.int32)
    # left padding only: once a row has a token, every later position is a token
    if (np.diff(mask, axis=1) < 0).any():
        raise GenerationError(
            "attention_mask has padding after a token: generate needs left padding (pad at the start of each "
            "row, e.g. tokenizer padding_side='left')"
        )
    if (mask.sum(axis=1) == 0).any():
        raise GenerationError("attention_mask has a row without any token (every prompt needs at least one)")
    return mask


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise GenerationError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _eos_set(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.zeros(0, np.int64)
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0:
            raise GenerationError(f"eos_token_id must be a token id >= 0 or a list of them, got {eos_token_id!r}")
    return np.asarray(ids, np.int64)


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator | None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """The next token of each row of ``logits [B, vocab]``: argmax (first maximum) unless ``do_sample``;
    else a draw from softmax(logits / temperature) restricted to the ``top_k`` largest logits and then to
    the smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely one always
    stays)."""
    if not do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    out = np.empty(logits.shape[0], np.int64)
    for r, row in enumerate(np.asarray(logits, np.float64)):
        z = row / float(temperature)
        order = np.argsort(-z, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if top_p is not None and top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        out[r] = order[int(rng.choice(len(p), p=p))]
    return out


def _decoder(
    lm: nn.Cell, batch: int, max_len: int, lean: bool | str | None = None, quantized_head: str | None = None
) -> CachedDecoder:
    """The cached decoder for (batch, max_len, lean), reused across calls (and so its compiled graphs) while
    the network keeps the same cells; a rewritten network (the pass, dequantize_model) gets a new one, and so
    does a network whose head got new memory (see ``CachedDecoder.derived_current``). At most one decoder
    per kind of step (lean or plain) is kept."""
    cells = [c for _, c in lm.cells_and_names()]
    holder = lm.__dict__.setdefault("_generation_decoder", [])  # a plain list: not a child cell of the network
    if holder:
        seen = holder[0][1]
        if not (len(seen) == len(cells) and all(a is b for a, b in zip(seen, cells, strict=True))):
            holder.clear()
    holder[:] = [(d, c) for d, c in holder if d.derived_current()]  # a reloaded head: its copies are stale
    fuse = lean != "ops"
    if lean == "ops":
        lean = True
    want = (decode_ops.available() and get_backend() == "cpu") if lean is None else bool(lean)
    for i, (dec, _) in enumerate(holder):
        if dec.lean != want or dec.quantized_head != quantized_head or dec.fuse_layers != fuse:
            continue
        if (dec.batch, dec.max_len) == (batch, max_len):
            for p in list(dec.k_cache) + list(dec.v_cache):
                p.set_data(Tensor(np.zeros(p.shape, np.float32)))
            return dec
        del holder[i]
        break
    dec = CachedDecoder(lm, batch, max_len, want, quantized_head, fuse)
    holder.append((dec, cells))  # the cells themselves (not ids, which a freed cell's successor could reuse)
    return dec


def _native_step(dec: CachedDecoder) -> NativeStep:
    """The decoder's native step, built once per decoder (again when a parameter got new memory); its caches
    are cleared for each generate call."""
    native = dec.__dict__.get("_native_step")
    if native is None or not native.current():
        try:
            native = NativeStep(dec)
        except NativeStepError as exc:
            raise GenerationError(f"decode_kernels='native': {exc}") from None
        object.__setattr__(dec, "_native_step", native)
    else:
        native.reset()
    return native


def _slots(batch: int, n_kv: int, start: int, t: int) -> np.ndarray:
    idx = np.empty((batch, n_kv, t, 3), np.int32)
    idx[..., 0] = np.arange(batch)[:, None, None]
    idx[..., 1] = np.arange(n_kv)[None, :, None]
    idx[..., 2] = start + np.arange(t)[None, None, :]
    return idx


def generate(
    lm: nn.Cell,
    input_ids: Any,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: Any = None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    streamer: Callable[[np.ndarray], bool | None] | None = None,
    decode_kernels: bool | str | None = None,
    quantized_head: str | None = None,
) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens after each prompt with a KV cache.

    Args:
        lm: a ``LlamaForCausalLM`` (float, or quantized by the pass or a loader).
        input_ids: ``[batch, length]`` (or ``[length]``) token ids: numpy, a list or a MindSpore Tensor.
        max_new_tokens: tokens to generate per prompt (>= 1).
        do_sample: sample (``temperature``, ``top_k``, ``top_p``) instead of greedy argmax.
        eos_token_id: token id(s) that end a sequence; default: the config's ``eos_token_id``. A finished
            sequence is padded with ``pad_token_id`` (default: the config's, else the first eos id);
            generation stops when every sequence has finished.
        attention_mask: ``[batch, length]``, 1 for tokens and 0 for (left) padding; default all ones.
        seed: seed of the sampling generator (numpy PCG64): the same seed gives the same tokens.
        streamer: called with the new tokens ``[batch]`` (int64) after each step; returning True stops
            generation there (the tokens so far are returned).
        decode_kernels: compute each step with the library's decode kernels (one aot kernel per RMSNorm,
            RoPE, attention and SwiGLU; q/k/v and gate/up projections fused into one kernel call each; see
            :class:`CachedDecoder`); where every projection of the decoder is 4-bit (float32, bfloat16 or int8 compute),
            each whole layer is one kernel launch (the same kernels in the same order: the same bits).
            Default: when the C++ kernel backend is in use. False: plain MindSpore ops (the reference the
            lean step is tested against). "ops": the decode kernels, one launch per op (for comparison).
            "native": the one-launch-per-layer step called through ctypes instead of MindSpore's graph
            executor (:class:`~msbnb_pass.models.native_step.NativeStep`: the same kernels and bits, without
            the executor's per-launch bookkeeping; 4-bit decoders only).
        quantized_head: None (default): the exact float32 head. "int8" (opt-in, not exact): an int8
            row-wise copy of the float head (tied embedding or float ``lm_head``), streamed at a quarter
            of the bytes per token; greedy tokens may differ from the float head's at near-ties.

    Returns the ids ``[batch, length + generated]`` (int64), prompts included.
    Raises :class:`GenerationError` (a ``MsbnbError``/``ValueError``) for unusable arguments.
    """
    cfg = lm.config
    ids = _as_ids(input_ids)
    b, p = ids.shape
    mask = _as_mask(attention_mask, (b, p))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    _check_sampling(do_sample, temperature, top_k, top_p)
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    eos = _eos_set(eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.size else 0)
    vocab = int(cfg.vocab_size)
    if (ids < 0).any() or (ids >= vocab).any():
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise GenerationError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab})")
    limit = int(lm.model.max_seq_len)
    needed = p + max_new_tokens
    if needed > limit:
        raise GenerationError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's {limit} positions "
            f"(max_seq_len / max_position_embeddings)"
        )
    s = min(limit, -(-needed // _SLOT_ROUND) * _SLOT_ROUND)
    if not (decode_kernels is None or isinstance(decode_kernels, bool) or decode_kernels in ("ops", "native")):
        raise GenerationError(f"decode_kernels must be None, True, False, 'ops' or 'native', got {decode_kernels!r}")
    native = decode_kernels == "native"
    dec = _decoder(lm, b, s, True if native else decode_kernels, _check_head(quantized_head))
    n_kv = dec.n_kv
    if native:
        run_step = _native_step(dec)
    else:

        def run_step(ids, positions, add, slots):
            return dec(Tensor(ids), Tensor(positions), Tensor(add), Tensor(slots)).asnumpy()

    rng = np.random.default_rng(seed) if do_sample else None

    # prefill: slots 0..p-1; a query sees the real tokens at or before its slot
    valid = np.zeros((b, s), bool)
    valid[:, :p] = mask.astype(bool)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    causal = np.arange(s)[None, :] <= np.arange(p)[:, None]  # [p, s]
    add = np.where(causal[None] & valid[:, None, :], np.float32(0), _MASKED).astype(np.float32)
    logits = run_step(ids, positions, add, _slots(b, n_kv, 0, p))

    out = [ids.astype(np.int64)]
    finished = np.zeros(b, bool)
    next_pos = positions[:, -1] + 1
    for step in range(max_new_tokens):
        tok = sample_next(logits, rng, do_sample, temperature, top_k, top_p)
        tok = np.where(finished, pad_token_id, tok)
        out.append(tok[:, None])
        stop = bool(streamer(tok)) if streamer is not None else False
        if eos.size:
            finished |= np.isin(tok, eos)
        if stop or finished.all() or step == max_new_tokens - 1:
            break
        slot = p + step
        valid[:, slot] = True
        add = np.where(valid & (np.arange(s)[None, :] <= slot), np.float32(0), _MASKED).astype(np.float32)
        logits = run_step(
            tok.astype(np.int32)[:, None],
            next_pos.astype(np.int32)[:, None],
            np.ascontiguousarray(add[:, None, :]),
            _slots(b, n_kv, slot, 1),
        )
        next_pos = next_pos + 1
    return np.concatenate(out, axis=1)


# ---- chat templates ----------------------------------------------------------------------------------------------
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"\{\{\s*'<\|im_start\|>system(?:\\n|\n)(?P<system>(?:[^'\\]|\\.)*?)<\|im_end\|>(?:\\n|\n)'\s*\}\}", re.DOTALL
)


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\'", "'").replace("\\\\", "\\")


def apply_chat_template(
    template: str | None,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a chat ``template`` (a tokenizer's Jinja ``chat_template``, e.g. a GGUF's
    ``tokenizer.chat_template``) for ``messages`` (``[{"role": ..., "content": ...}]``).

    With ``jinja2`` installed any template is rendered by it (sandboxed). Without it, ChatML templates
    (``<|im_start|>role\\ncontent<|im_end|>\\n``, SmolLM2's and Qwen's family), including a default system
    prompt the template inserts when the first message is not a system message, are rendered by a small
    renderer; other templates raise :class:`GenerationError`."""
    if not template:
        raise GenerationError("the model has no chat template (tokenizer.chat_template / tokenizer_config.json)")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GenerationError(f"each message must be a dict with string 'role' and 'content', got {m!r}")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return _render_chatml(template, messages, add_generation_prompt)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
    )


def _render_chatml(template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    if "<|im_start|>" not in template or "message['role']" not in template or "message['content']" not in template:
        raise GenerationError(
            "this chat template is not ChatML and jinja2 is not installed (pip install jinja2 renders any template)"
        )
    parts = []
    default = _CHATML_DEFAULT_SYSTEM.search(template)
    if default is not None and messages and messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{_unescape(default.group('system'))}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt and "add_generation_prompt" in template:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
