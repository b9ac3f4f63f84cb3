"""Checkpoint formats, one module each, over the numpy formats: transformers + bitsandbytes safetensors
directories (``transformers_io``, on ``safetensors_io``) and llama.cpp GGUF files (``gguf_io``). Readers
return a transformers config dict and a :class:`TensorStore` keyed by transformers' names; writers take
the same. Nothing here imports MindSpore or the models."""

from .errors import CheckpointError
from .gguf_io import GGUFContents, open_gguf, read_gguf, tokenizer_from_gguf
from .safetensors_io import SafetensorsFile, atomic_write, bf16_to_float32, float32_to_bf16, write_safetensors
from .transformers_io import TensorStore, open_safetensors, read_config, write_checkpoint

__all__ = [
    "CheckpointError",
    "GGUFContents",
    "SafetensorsFile",
    "TensorStore",
    "atomic_write",
    "bf16_to_float32",
    "float32_to_bf16",
    "open_gguf",
    "open_safetensors",
    "read_config",
    "read_gguf",
    "tokenizer_from_gguf",
    "write_checkpoint",
    "write_safetensors",
]
