"""A BERT encoder in plain ``mindspore.nn`` (the all-MiniLM-L6-v2 shape): ``construct(input_ids,
attention_mask) -> last hidden state``. Parameter paths equal transformers' ``BertModel`` state-dict keys
(``encoder.layer.0.attention.self.query.weight``); the pooler is built (so strict loading accounts for
its weights) and available as ``pool(hidden)``, but ``construct`` returns the last hidden state.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ._layers import LayerNorm, WeightSource, name_parameters
from .configs import BertConfig

_MASKED = -1e30

# state-dict keys of buffers transformers saves that are not weights (recognised, not loaded)
BERT_BUFFERS = ("embeddings.position_ids",)


def _activation(name: str):
    if name == "relu":
        return ops.relu
    return ops.gelu


class BertEmbeddings(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = source.embedding(f"{name}.word_embeddings", config.vocab_size, h)
        self.position_embeddings = source.embedding(f"{name}.position_embeddings", config.max_position_embeddings, h)
        self.token_type_embeddings = source.embedding(f"{name}.token_type_embeddings", config.type_vocab_size, h)
        self.LayerNorm = LayerNorm(source, f"{name}.LayerNorm", h, config.layer_norm_eps)

    def construct(self, input_ids, token_type_ids):
        t = input_ids.shape[1]
        pos = ops.arange(0, t, 1, dtype=ms.int32)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = float(self.head_dim) ** -0.5
        self.query = source.dense(f"{name}.query", h, h, True)
        self.key = source.dense(f"{name}.key", h, h, True)
        self.value = source.dense(f"{name}.value", h, h, True)

    def construct(self, x, mask):
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 3, 1)
        v = self.value(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        probs = ops.softmax(ops.matmul(q, k) * self.scale + mask, -1)
        return ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, t, self.n_heads * self.head_dim)


class BertSelfOutput(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str, in_features: int):
        super().__init__()
        h = config.hidden_size
        self.dense = source.dense(f"{name}.dense", in_features, h, True)
        self.LayerNorm = LayerNorm(source, f"{name}.LayerNorm", h, config.layer_norm_eps)

    def construct(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        self.self = BertSelfAttention(config, source, f"{name}.self")
        self.output = BertSelfOutput(config, source, f"{name}.output", config.hidden_size)

    def construct(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        self.dense = source.dense(f"{name}.dense", config.hidden_size, config.intermediate_size, True)
        self.relu = config.hidden_act == "relu"
        self.approximate = "tanh" if config.hidden_act == "gelu_new" else "none"

    def construct(self, x):
        y = self.dense(x)
        if self.relu:
            return ops.relu(y)
        return ops.gelu(y, approximate=self.approximate)


class BertLayer(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        self.attention = BertAttention(config, source, f"{name}.attention")
        self.intermediate = BertIntermediate(config, source, f"{name}.intermediate")
        self.output = BertSelfOutput(config, source, f"{name}.output", config.intermediate_size)

    def construct(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        self.layer = nn.CellList(
            [BertLayer(config, source, f"{name}.layer.{i}") for i in range(config.num_hidden_layers)]
        )

    def construct(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Cell):
    def __init__(self, config: BertConfig, source: WeightSource, name: str):
        super().__init__()
        self.dense = source.dense(f"{name}.dense", config.hidden_size, config.hidden_size, True)

    def construct(self, hidden):
        return ops.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Cell):
    """``construct(input_ids [B, T] int32, attention_mask [B, T] (1 = token, 0 = padding) = None,
    token_type_ids = None) -> last hidden state [B, T, H]`` (float32)."""

    def __init__(self, config: BertConfig, source: WeightSource | None = None, with_pooler: bool = True):
        super().__init__()
        source = source if source is not None else WeightSource(config.initializer_range)
        self.config = config
        self.embeddings = BertEmbeddings(config, source, "embeddings")
        self.encoder = BertEncoder(config, source, "encoder")
        self.with_pooler = bool(with_pooler)
        if self.with_pooler:
            self.pooler = BertPooler(config, source, "pooler")
        name_parameters(self)

    def construct(self, input_ids, attention_mask=None, token_type_ids=None):
        b, t = input_ids.shape
        if token_type_ids is None:
            token_type_ids = ops.zeros((b, t), ms.int32)
        if attention_mask is None:
            mask = ops.zeros((b, 1, 1, t), ms.float32)
        else:
            mask = (1.0 - ops.cast(attention_mask, ms.float32).reshape(b, 1, 1, t)) * _MASKED
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

    def pool(self, hidden):
        """BERT's pooler output ``tanh(dense(hidden[:, 0]))``."""
        return self.pooler(hidden)
