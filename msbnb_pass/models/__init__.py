"""Network definitions in plain ``mindspore.nn``: a LLaMA-family decoder and a BERT encoder.

They know nothing of quantization: every linear layer is an ``nn.Dense`` (or whatever the
:class:`WeightSource` they are built from returns), so the pass quantizes them like any user network,
and parameter paths are transformers' state-dict keys.
"""

from ._layers import Embedding, LayerNorm, RMSNorm, WeightSource, name_parameters
from .bert import BERT_BUFFERS, BertModel
from .configs import MODEL_CONFIGS, BertConfig, LlamaConfig, config_from_dict
from .llama import LlamaForCausalLM, LlamaModel, causal_lm_loss, rope_tables

__all__ = [
    "BERT_BUFFERS",
    "MODEL_CONFIGS",
    "BertConfig",
    "BertModel",
    "Embedding",
    "LayerNorm",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "WeightSource",
    "build_model",
    "causal_lm_loss",
    "config_from_dict",
    "name_parameters",
    "rope_tables",
]


def build_model(config, source: WeightSource | None = None, **kwargs):
    """The network for ``config`` (a LlamaConfig or BertConfig): LlamaForCausalLM or BertModel."""
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config, source, **kwargs)
    if isinstance(config, BertConfig):
        return BertModel(config, source, **kwargs)
    raise TypeError(f"build_model expects a LlamaConfig or BertConfig, got {type(config).__name__}")
