"""Test networks with the shapes real MindSpore models have (used by the pass tests and tools)."""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops


def _w(rng, *shape, scale=0.05):
    return Tensor((rng.standard_normal(shape) * scale).astype(np.float32))


def _dense(rng, d_in, d_out, **kwargs):
    """nn.Dense with seeded weight and bias (two instances built with the same seed are identical)."""
    if kwargs.get("has_bias", True):
        kwargs.setdefault("bias_init", _w(rng, d_out))
    return nn.Dense(d_in, d_out, weight_init=_w(rng, d_out, d_in), **kwargs)


class RMSNorm(nn.Cell):
    def __init__(self, d):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(d, np.float32)))

    def construct(self, x):
        return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + 1e-6) * self.weight


class LlamaAttention(nn.Cell):
    """Projections as Parameters used through primitive attributes: self.mm_q(x, self.wq) etc."""

    def __init__(self, d, rng):
        super().__init__()
        self.d = d
        self.wq, self.wk, self.wv, self.wo = (Parameter(_w(rng, d, d), name=n) for n in ("wq", "wk", "wv", "wo"))
        self.mm_q = ops.MatMul(transpose_b=True)
        self.mm_k = ops.MatMul(transpose_b=True)
        self.mm_v = ops.MatMul(transpose_b=True)
        self.mm_o = ops.MatMul(transpose_b=True)
        self.softmax = ops.Softmax(-1)

    def construct(self, x):
        b, s, d = x.shape
        h = x.reshape((-1, d))
        q = self.mm_q(h, self.wq).reshape((b, s, d))
        k = self.mm_k(h, self.wk).reshape((b, s, d))
        v = self.mm_v(h, self.wv).reshape((b, s, d))
        att = self.softmax(ops.bmm(q, k.transpose(0, 2, 1)) / (d**0.5))
        o = ops.bmm(att, v).reshape((-1, d))
        return self.mm_o(o, self.wo).reshape((b, s, d))


class LlamaMLP(nn.Cell):
    def __init__(self, d, hidden, rng):
        super().__init__()
        self.gate_proj = _dense(rng, d, hidden, has_bias=False)
        self.up_proj = _dense(rng, d, hidden, has_bias=False)
        self.down_proj = _dense(rng, hidden, d, has_bias=False)
        self.act = nn.SiLU()

    def construct(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Cell):
    def __init__(self, d, hidden, rng):
        super().__init__()
        self.input_layernorm = RMSNorm(d)
        self.self_attn = LlamaAttention(d, rng)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = LlamaMLP(d, hidden, rng)

    def construct(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Cell):
    """A LLaMA-shaped decoder; the output head reuses the embedding table (tied weights)."""

    def __init__(self, vocab=96, d=64, hidden=128, layers=2, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embed_tokens = nn.Embedding(vocab, d, embedding_table=_w(rng, vocab, d, scale=1.0))
        self.layers = nn.CellList([LlamaLayer(d, hidden, rng) for _ in range(layers)])
        self.norm = RMSNorm(d)

    def construct(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return ops.matmul(h, self.embed_tokens.embedding_table.T)  # tied output head


class BertLayer(nn.Cell):
    def __init__(self, d, ffn, rng):
        super().__init__()
        self.query = _dense(rng, d, d)
        self.key = _dense(rng, d, d)
        self.value = _dense(rng, d, d)
        self.attn_out = _dense(rng, d, d)
        self.ln1 = nn.LayerNorm((d,))
        self.intermediate = _dense(rng, d, ffn, activation="gelu")
        self.output = _dense(rng, ffn, d)
        self.ln2 = nn.LayerNorm((d,))
        self.softmax = nn.Softmax(-1)
        self.d = d

    def construct(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = self.softmax(ops.bmm(q, k.transpose(0, 2, 1)) / (self.d**0.5))
        x = self.ln1(x + self.attn_out(ops.bmm(att, v)))
        return self.ln2(x + self.output(self.intermediate(x)))


class BertLike(nn.Cell):
    """A BERT-like encoder: Dense projections, LayerNorm, a pooler and a classifier head."""

    def __init__(self, vocab=96, d=64, ffn=128, layers=2, classes=3, seed=1):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embeddings = nn.Embedding(vocab, d, embedding_table=_w(rng, vocab, d, scale=1.0))
        self.encoder = nn.SequentialCell([BertLayer(d, ffn, rng) for _ in range(layers)])
        self.pooler = _dense(rng, d, d, activation="tanh")
        self.classifier = _dense(rng, d, classes)

    def construct(self, ids):
        h = self.encoder(self.embeddings(ids))
        return self.classifier(self.pooler(h[:, 0]))


class Gate(nn.Cell):
    """Reads its weight twice (so it cannot be moved) and shares one primitive between two calls."""

    def __init__(self, d, rng):
        super().__init__()
        self.w = Parameter(_w(rng, d, d), name="w")
        self.w2 = Parameter(_w(rng, d, d), name="w2")
        self.mm = ops.MatMul()

    def construct(self, x):
        h = self.mm(x, self.w)
        return self.mm(h, self.w2) + x.sum() * self.w.mean()


class Helper(nn.Cell):
    """construct calls another method of the cell, which holds the matmul."""

    def __init__(self, d, rng):
        super().__init__()
        self.proj = Parameter(_w(rng, d, d), name="proj")
        self.matmul = ops.MatMul(transpose_b=True)
        self.use_relu = True

    def _project(self, x):
        return self.matmul(x, self.proj)

    def construct(self, x):
        y = self._project(x)
        if self.use_relu:
            y = ops.relu(y)
        return y


def _opaque_construct():
    namespace = {}
    exec("def construct(self, x):\n    return self.inner(x)\n", namespace)  # noqa: S102 - no source on purpose
    return namespace["construct"]


Opaque = type("Opaque", (nn.Cell,), {"construct": _opaque_construct()})


class Containers(nn.Cell):
    """SequentialCell, CellList, CellDict, if/for, a cell reused at two places, helper methods, a primitive
    shared by two calls, a weight read twice, a parameter that is not 2-D."""

    def __init__(self, d=64, seed=2):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.seq = nn.SequentialCell([_dense(rng, d, d), nn.ReLU()])
        self.blocks = nn.CellList([_dense(rng, d, d) for _ in range(2)])
        self.heads = nn.CellDict({"a": _dense(rng, d, d)})
        self.shared = _dense(rng, d, d)
        self.again = self.shared  # the same cell at a second path
        self.gate = Gate(d, rng)
        self.helper = Helper(d, rng)
        self.scale = Parameter(Tensor(np.ones((d,), np.float32)), name="scale")
        self.steps = 2

    def construct(self, x):
        x = self.seq(x)
        for block in self.blocks:
            x = block(x)
        if self.steps > 1:
            x = self.heads["a"](x)
        x = self.again(self.shared(x))
        x = self.gate(x) * 0.1 + x
        x = self.helper(x)
        return x * self.scale


class OpaqueNet(nn.Cell):
    """Holds a cell whose source cannot be read (PyNative only: GRAPH_MODE needs the source)."""

    def __init__(self, d=64, seed=4):
        super().__init__()
        rng = np.random.default_rng(seed)
        opaque = Opaque()
        opaque.inner = _dense(rng, d, d)
        opaque.table = Parameter(_w(rng, d, d), name="table")
        self.opaque = opaque

    def construct(self, x):
        return self.opaque(x)


class TiedHead(nn.Cell):
    """An embedding whose table is also the output head's weight, through a primitive attribute."""

    def __init__(self, vocab=96, d=64, seed=5):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embed = nn.Embedding(vocab, d, embedding_table=_w(rng, vocab, d, scale=1.0))
        self.proj = _dense(rng, d, d)
        self.head_mm = ops.MatMul(transpose_b=True)

    def construct(self, ids):
        h = self.proj(self.embed(ids))
        return self.head_mm(h.reshape((-1, h.shape[-1])), self.embed.embedding_table)


class MyLinear(nn.Cell):
    """A user's Linear keeping its weight in self.w as [in, out] (y = x @ w + b)."""

    def __init__(self, d_in, d_out, rng):
        super().__init__()
        self.w = Parameter(_w(rng, d_in, d_out), name="w")
        self.b = Parameter(Tensor(np.zeros(d_out, np.float32)), name="b")

    def construct(self, x):
        return ops.matmul(x, self.w) + self.b


class UsesMyLinear(nn.Cell):
    def __init__(self, d=64, seed=3):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.a = MyLinear(d, 2 * d, rng)
        self.b = MyLinear(2 * d, d, rng)

    def construct(self, x):
        return self.b(ops.relu(self.a(x)))


def make_llama():
    return LlamaLike()


def make_bert():
    return BertLike()


def make_containers():
    return Containers()


def make_uses_my_linear():
    return UsesMyLinear()


class ProjBias(nn.Cell):
    """self.mm(x, self.w) followed by self.add(<that>, self.b): the fused matmul-param-bias pattern, once with a
    transposed weight ([out, in], transpose_b=True) and once untransposed ([in, out], transpose_b=False)."""

    def __init__(self, d=64, seed=6):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w_t = Parameter(_w(rng, 2 * d, d), name="w_t")  # [out, in]
        self.b_t = Parameter(_w(rng, 2 * d), name="b_t")
        self.mm_t = ops.MatMul(transpose_b=True)
        self.add_t = ops.BiasAdd()
        self.w_n = Parameter(_w(rng, 2 * d, d), name="w_n")  # [in, out]
        self.b_n = Parameter(_w(rng, d), name="b_n")
        self.mm_n = ops.MatMul()
        self.add_n = ops.Add()

    def construct(self, x):
        h = ops.relu(self.add_t(self.mm_t(x, self.w_t), self.b_t))
        return self.add_n(self.mm_n(h, self.w_n), self.b_n)


class TransposedActivation(nn.Cell):
    """self.mm(x, self.w) with transpose_a=True: x is [in, rows], which the quantized matmul does not take."""

    def __init__(self, d=64, seed=7):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = Parameter(_w(rng, d, d), name="w")
        self.mm = ops.MatMul(transpose_a=True, transpose_b=True)

    def construct(self, x):
        return self.mm(x, self.w)
