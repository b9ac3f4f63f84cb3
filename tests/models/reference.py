"""Numpy forwards (float64) of the LLaMA decoder and the BERT encoder from transformers-keyed float weights:
the oracle the MindSpore models and the loaded checkpoints are compared with. Written from the
architectures' definitions (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU; post-LN BERT with
exact GELU), independently of the MindSpore code."""

from __future__ import annotations

import math

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def llama_forward(sd: dict[str, np.ndarray], cfg: dict, input_ids: np.ndarray, linear=None) -> np.ndarray:
    """Logits [B, T, V] in float64. ``linear(name, x) -> y`` replaces the float projection of a decoder layer's
    linear ``name`` (e.g. an LLM.int8() reference), when given and it returns non-None."""
    g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    b, t = input_ids.shape
    x = g["model.embed_tokens.weight"][input_ids]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)  # [t, hd/2]

    def rope(v):  # v [b, h, t, hd], halves layout
        v1, v2 = v[..., : hd // 2], v[..., hd // 2 :]
        return np.concatenate([v1 * cos - v2 * sin, v2 * cos + v1 * sin], -1)

    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, g[p + "input_layernorm.weight"], eps)

        def proj(name, inp, p=p):
            if linear is not None:
                out = linear(p + name, inp)
                if out is not None:
                    return np.asarray(out, np.float64)
            y = inp @ g[p + name + ".weight"].T
            return y + g[p + name + ".bias"] if p + name + ".bias" in g else y

        q = proj("self_attn.q_proj", h).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = proj("self_attn.k_proj", h).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        v = proj("self_attn.v_proj", h).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        a = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + causal) @ v
        x = x + proj("self_attn.o_proj", a.transpose(0, 2, 1, 3).reshape(b, t, nh * hd))
        h = _rms(x, g[p + "post_attention_layernorm.weight"], eps)
        gate = proj("mlp.gate_proj", h)
        x = x + proj("mlp.down_proj", gate / (1 + np.exp(-gate)) * proj("mlp.up_proj", h))
    x = _rms(x, g["model.norm.weight"], eps)
    head = g["lm_head.weight"] if "lm_head.weight" in g else g["model.embed_tokens.weight"]
    return x @ head.T


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def bert_forward(sd: dict[str, np.ndarray], cfg: dict, input_ids: np.ndarray, attention_mask=None) -> np.ndarray:
    """Last hidden state [B, T, H] in float64 (absolute positions, token type 0, exact GELU)."""
    g = {k: np.asarray(v, np.float64) for k, v in sd.items() if k != "embeddings.position_ids"}
    nh, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    b, t = input_ids.shape
    hd = cfg["hidden_size"] // nh
    x = (
        g["embeddings.word_embeddings.weight"][input_ids]
        + g["embeddings.position_embeddings.weight"][np.arange(t)][None]
        + g["embeddings.token_type_embeddings.weight"][0]
    )
    x = _ln(x, g["embeddings.LayerNorm.weight"], g["embeddings.LayerNorm.bias"], eps)
    mask = np.zeros((b, 1, 1, t)) if attention_mask is None else (1.0 - attention_mask[:, None, None, :]) * -1e30

    def lin(name, inp):
        return inp @ g[name + ".weight"].T + g[name + ".bias"]

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = lin(p + "attention.self.query", x).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = lin(p + "attention.self.key", x).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        v = lin(p + "attention.self.value", x).reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        a = (_softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = _ln(
            lin(p + "attention.output.dense", a) + x,
            g[p + "attention.output.LayerNorm.weight"],
            g[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        hmid = lin(p + "intermediate.dense", x)
        hmid = 0.5 * hmid * (1.0 + _erf(hmid / math.sqrt(2.0)))
        x = _ln(
            lin(p + "output.dense", hmid) + x, g[p + "output.LayerNorm.weight"], g[p + "output.LayerNorm.bias"], eps
        )
    return x
