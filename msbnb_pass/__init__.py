"""msbnb_pass: bitsandbytes for MindSpore, as a graph-rewrite pass.

The public API is flat and loaded lazily: ``import msbnb_pass`` is cheap and imports MindSpore only
when a name that needs it is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS = {
    # configs
    "BitsAndBytesConfig": "config",
    "QuantConfig": "config",
    "Int8Config": "config",
    "Int4Config": "config",
    # the seed's functional API (MindSpore Tensors)
    "quantize_8bit": "functional",
    "dequantize_8bit": "functional",
    "quantize_4bit": "functional",
    "dequantize_4bit": "functional",
    "estimate_quantization_error": "functional",
    "get_quantization_info": "functional",
    # the numpy formats (the oracle)
    "QuantState": "formats",
    # quantized cells
    "Linear8bit": "nn",
    "Linear8bitLt": "nn",
    "Embedding4bit": "nn",
    "Embedding8bit": "nn",
    "EmbeddingFP4": "nn",
    "EmbeddingNF4": "nn",
    "Linear4bit": "nn",
    # the pass
    "apply": "passes",
    "quantize": "passes",
    "explain": "passes",
    "PassResult": "passes",
    "PassError": "passes",
    "ErrorBudget": "mixed",
    "Rule": "rules",
    "RuleSet": "rules",
    "RuleError": "rules",
    # errors: one hierarchy under MsbnbError (a ValueError)
    "MsbnbError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "MatchConflict": "errors",
    "QuantizationError": "errors",
    "RewriteError": "errors",
    "register_linear": "rules",
    "register_check": "rules",
    "register_replacement": "rules",
    "register_kernel": "kernels",
    "build_graph": "graph",
    "NetGraph": "graph",
    # the seed's converter API
    "convert_to_quantized_model": "converter",
    "replace_linear_layers": "converter",
    "quantize_model_weights": "converter",
    "get_model_size": "converter",
    "compare_model_sizes": "converter",
    # checkpoints on disk (transformers + bitsandbytes safetensors, GGUF)
    "from_pretrained": "pretrained",
    "save_pretrained": "pretrained",
    "dequantize_model": "pretrained",
    "tokenizer_from_pretrained": "pretrained",
    # LoRA / QLoRA
    "LoraConfig": "lora",
    "LoRALinear": "lora",
    "Linear4bitWithLoRA": "lora",
    "Linear8bitWithLoRA": "lora",
    "add_lora": "lora",
    "get_qlora_model": "passes",
    "freeze_model_except_lora": "lora",
    "print_lora_info": "lora",
    "merge_lora": "lora",
    "unmerge_lora": "lora",
    "merge_and_unload": "lora",
    "save_lora_adapters": "lora",
    "load_lora_adapters": "lora",
    "prepare_model_for_kbit_training": "lora",
    # 8-bit optimizers
    "AdamW8bit": "optim",
    "Adam8bit": "optim",
}

_SUBMODULES = (
    "errors",
    "formats",
    "kernels",
    "nn",
    "functional",
    "config",
    "graph",
    "rules",
    "match",
    "rewrite",
    "passes",
    "models",
    "io",
    "pretrained",
    "lora",
    "optim",
)

__all__ = ["__version__", "dump", "verify", *_SUBMODULES, *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in ("verify", "dump"):  # callable modules: msbnb_pass.verify(...) and msbnb_pass.dump(...)
        return importlib.import_module(f".{name}", __name__)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'msbnb_pass' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
