"""Model configurations with transformers' field names (``LlamaConfig``, ``BertConfig``).

Plain dataclasses: ``from_dict`` reads a transformers ``config.json`` dict (unknown fields are kept in
``extra`` so that writing the config back loses nothing), ``to_dict`` writes it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar


def _positive(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


class _ConfigBase:
    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    extra: dict

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a transformers ``config.json`` dict; fields this class does not model go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "quantization_config"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict (without ``quantization_config``)."""
        out = dict(self.extra)
        out.setdefault("architectures", [self.architecture])
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return dict(sorted(out.items()))


@dataclass
class LlamaConfig(_ConfigBase):
    """A LLaMA-family decoder (LLaMA 1/2/3 without rope scaling, SmolLM, TinyLlama ...): transformers' names."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "LlamaConfig"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _positive(owner, name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive(owner, "num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{owner}: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"{owner}: hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_attention_heads}; give head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive(owner, "head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"{owner}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"{owner}: hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get(
            "rope_type", self.rope_scaling.get("type")
        ) not in (
            None,
            "default",
        ):
            raise ValueError(
                f"{owner}: rope_scaling={self.rope_scaling!r} is not supported (accepted: null or rope_type 'default')"
            )

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass
class BertConfig(_ConfigBase):
    """A BERT encoder (all-MiniLM-L6-v2 and the like): transformers' names."""

    model_type: ClassVar[str] = "bert"
    architecture: ClassVar[str] = "BertModel"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "BertConfig"
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _positive(owner, name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{owner}: hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(
                f"{owner}: hidden_act must be one of ('gelu', 'gelu_new', 'relu'), got {self.hidden_act!r}"
            )
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"{owner}: position_embedding_type must be 'absolute', got {self.position_embedding_type!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODEL_CONFIGS = MappingProxyType({"llama": LlamaConfig, "bert": BertConfig})


def config_from_dict(data: dict[str, Any]) -> LlamaConfig | BertConfig:
    """The config of the class named by ``model_type`` (accepted: 'llama', 'bert')."""
    model_type = data.get("model_type")
    cls = MODEL_CONFIGS.get(model_type)
    if cls is None:
        raise ValueError(f"model_type {model_type!r} is not supported (accepted: {sorted(MODEL_CONFIGS)})")
    return cls.from_dict(data)
