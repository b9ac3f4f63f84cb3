"""A LLaMA-family decoder in plain ``mindspore.nn``: RMSNorm, RoPE (``rope_theta``), grouped-query
attention, SwiGLU MLP, tied or untied output head. Parameter paths equal transformers' state-dict keys
(``model.layers.0.self_attn.q_proj.weight``), so checkpoints map one to one and the pass's dumps speak
the same names.

The forward is kept lean for CPU: cos/sin tables are precomputed up to ``max_seq_len`` positions and
gathered by position; RoPE uses transformers' ``rotate_half`` layout (two contiguous halves, no strided
slices); grouped-query attention folds the query heads sharing a key/value head into the row axis of one
batched matmul instead of copying keys and values ``n_rep`` times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ._layers import RMSNorm, Softmax, WeightSource, name_parameters
from .configs import LlamaConfig

_MASKED = -1e30  # added to masked attention scores: exp() underflows to exactly 0


def rope_tables(head_dim: int, theta: float, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``cos``/``sin`` tables ``[n_positions, head_dim]`` in the rotate-half layout (computed in
    float64, rounded once)."""
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate_half(x, half: int):
    x1, x2 = ops.split(x, half, -1)
    return ops.cat((-x2, x1), -1)


def causal_lm_loss(logits, labels):
    """Mean cross entropy of ``logits [..., vocab]`` against int32 ``labels [...]`` (the next tokens), for
    a jit train step, with MindSpore's fused ``SparseSoftmaxCrossEntropyWithLogits``.

    ``nn.CrossEntropyLoss`` decomposes into broadcasting element-wise ops, and MindSpore's CPU kernel for
    a broadcasting binary op keeps two ``size_t`` index arrays of its output's size for as long as the
    graph lives: about 69 bytes per logit in a train step, measured (some 280 MB for 128 tokens of a
    32,000-word vocabulary, in full fine-tuning and QLoRA alike). The fused kernel keeps none."""
    vocab = logits.shape[-1]
    return ops.SparseSoftmaxCrossEntropyWithLogits()(logits.reshape(-1, vocab), labels.reshape(-1))


class LlamaAttention(nn.Cell):
    def __init__(self, config: LlamaConfig, source: WeightSource, name: str):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.n_rep = config.n_rep
        self.head_dim = hd
        self.half = hd // 2
        self.scale = float(hd) ** -0.5
        bias = config.attention_bias
        self.q_proj = source.dense(f"{name}.q_proj", h, self.n_heads * hd, bias)
        self.k_proj = source.dense(f"{name}.k_proj", h, self.n_kv * hd, bias)
        self.v_proj = source.dense(f"{name}.v_proj", h, self.n_kv * hd, bias)
        self.o_proj = source.dense(f"{name}.o_proj", self.n_heads * hd, h, bias)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.softmax = Softmax()

    def construct(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        # same-shape products (see RMSNorm: a broadcasting multiply keeps index arrays alive)
        cq, sq = ops.broadcast_to(cos, q.shape), ops.broadcast_to(sin, q.shape)
        ck, sk = ops.broadcast_to(cos, k.shape), ops.broadcast_to(sin, k.shape)
        q = q * cq + _rotate_half(q, self.half) * sq
        k = k * ck + _rotate_half(k, self.half) * sk
        # query head j uses key/value head j // n_rep: fold the n_rep heads of a group into the rows
        q = q.reshape(b, self.n_kv, self.n_rep * t, self.head_dim)
        scores = self.qk_matmul(q, k) * self.scale  # q @ k^T without a transposed copy of k
        scores = scores.reshape(b, self.n_kv, self.n_rep, t, t)
        scores = scores + ops.broadcast_to(mask, scores.shape)
        probs = self.softmax(scores.reshape(b, self.n_kv, self.n_rep * t, t))
        out = ops.matmul(probs, v).reshape(b, self.n_heads, t, self.head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim))


class LlamaMLP(nn.Cell):
    def __init__(self, config: LlamaConfig, source: WeightSource, name: str):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = source.dense(f"{name}.gate_proj", h, i, bias)
        self.up_proj = source.dense(f"{name}.up_proj", h, i, bias)
        self.down_proj = source.dense(f"{name}.down_proj", i, h, bias)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config: LlamaConfig, source: WeightSource, name: str):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(source, f"{name}.input_layernorm", h, eps)
        self.self_attn = LlamaAttention(config, source, f"{name}.self_attn")
        self.post_attention_layernorm = RMSNorm(source, f"{name}.post_attention_layernorm", h, eps)
        self.mlp = LlamaMLP(config, source, f"{name}.mlp")

    def construct(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and the final norm: ``construct(input_ids) -> hidden states [B, T, H]``."""

    def __init__(self, config: LlamaConfig, source: WeightSource, name: str = "model", max_seq_len: int = 8192):
        super().__init__()
        self.embed_tokens = source.embedding(
            f"{name}.embed_tokens", config.vocab_size, config.hidden_size, not config.tie_word_embeddings
        )
        self.layers = nn.CellList(
            [LlamaDecoderLayer(config, source, f"{name}.layers.{i}") for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(source, f"{name}.norm", config.hidden_size, config.rms_norm_eps)
        n = min(int(config.max_position_embeddings), int(max_seq_len))
        cos, sin = rope_tables(config.head_dim, config.rope_theta, n)
        self.max_seq_len = n
        self.cos_table = Tensor(cos)
        self.sin_table = Tensor(sin)

    def construct(self, input_ids):
        t = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        pos = ops.arange(0, t, 1, dtype=ms.int32)
        cos = ops.gather(self.cos_table, pos, 0)
        sin = ops.gather(self.sin_table, pos, 0)
        future = ops.cast(pos.reshape(1, -1) > pos.reshape(-1, 1), ms.float32)
        mask = future * _MASKED
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class LlamaForCausalLM(nn.Cell):
    """``construct(input_ids [B, T] int32) -> logits [B, T, vocab]`` (float32).

    Args:
        config: a :class:`LlamaConfig` (transformers' field names).
        source: where the weights come from (default: random initialisation); see ``WeightSource``.
        max_seq_len: positions covered by the precomputed RoPE tables (capped by
            ``max_position_embeddings``).
    """

    def __init__(self, config: LlamaConfig, source: WeightSource | None = None, max_seq_len: int = 8192):
        super().__init__()
        source = source if source is not None else WeightSource(config.initializer_range)
        self.config = config
        self.model = LlamaModel(config, source, "model", max_seq_len)
        self.tied = bool(config.tie_word_embeddings)
        if self.tied:
            self.head_matmul = ops.MatMul(transpose_b=True)
        else:
            self.lm_head = source.dense("lm_head", config.hidden_size, config.vocab_size, False)
        name_parameters(self)

    def construct(self, input_ids):
        return self.head(self.model(input_ids))

    def head(self, h):
        """Logits ``[B, T, vocab]`` of final hidden states ``[B, T, H]``."""
        if self.tied:
            b, t, d = h.shape
            return self.head_matmul(h.reshape(b * t, d), self.model.embed_tokens.weight).reshape(b, t, -1)
        return self.lm_head(h)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        attention_mask: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Token ids ``[batch, prompt + new]`` generated with a static-shape KV cache (one compiled graph
        per step shape); see :func:`msbnb_pass.models.generation.generate` for every argument."""
        from .generation import generate

        return generate(
            self,
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            attention_mask=attention_mask,
            seed=seed,
            **kwargs,
        )
