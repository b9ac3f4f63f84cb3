"""The seed's converter API on top of the pass: convert a model, replace layers, sizes."""

from __future__ import annotations

import logging
from typing import Any

from mindspore import nn

from .config import BitsAndBytesConfig, QuantConfig
from .memory import parameter_bytes
from .nn import Linear4bit, Linear8bit, Linear8bitLt, QuantLinear
from .passes import PassResult, apply

logger = logging.getLogger(__name__)


def convert_to_quantized_model(
    model: nn.Cell,
    config: QuantConfig | BitsAndBytesConfig | None = None,
    modules_to_not_convert: list[str] | None = None,
    **apply_kwargs: Any,
) -> nn.Cell:
    """Quantize every Linear layer of ``model`` in place as ``config`` says (default: Int8Config()) and
    return it. ``modules_to_not_convert`` is added to the config's skipped modules (``lm_head`` always)."""
    from .config import Int8Config
    from .config_rules import rules_for_config

    config = Int8Config() if config is None else config
    if not isinstance(config, (QuantConfig, BitsAndBytesConfig)):
        raise TypeError(
            f"config must be a QuantConfig (Int8Config, Int4Config) or BitsAndBytesConfig, got {type(config).__name__}"
        )
    rules = rules_for_config(config)
    if modules_to_not_convert:
        if isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        rules = rules.copy(
            [r.with_changes(where={"exclude": [*r.where.get("exclude", []), *modules_to_not_convert]}) for r in rules]
        )
    result = apply(model, rules, **apply_kwargs)
    logger.info("convert_to_quantized_model: %s", result.summary().replace("\n", "; "))
    return model


_TARGETS = {Linear8bit: "linear8bit", Linear8bitLt: "linear8bitlt", Linear4bit: "linear4bit"}


def replace_linear_layers(
    model: nn.Cell, target_cls: type = Linear8bit, modules_to_not_convert: list[str] | None = None, **layer_kwargs: Any
) -> nn.Cell:
    """Swap every Linear-like layer for ``target_cls`` (Linear8bit, Linear8bitLt or Linear4bit), in place.

    ``Linear8bit`` layers start in the seed's training mode (float weights, ``has_fp16_weights=True``)
    unless ``has_fp16_weights=False`` is given; quantize them later with ``quantize_model_weights``.
    Other keyword arguments go to the replacement (e.g. ``quant_type="nf4"``, ``threshold=6.0``).
    """
    from .rules import Rule, RuleSet

    if target_cls not in _TARGETS:
        raise ValueError(f"target_cls must be one of {[c.__name__ for c in _TARGETS]}, got {target_cls!r}")
    params = dict(layer_kwargs)
    if target_cls is Linear8bit:
        params.setdefault("has_fp16_weights", True)
    if target_cls is Linear4bit and "group_size" in params:
        params["blocksize"] = params.pop("group_size")
    if target_cls is Linear4bit and "compress_statistics" in params:
        params["double_quant"] = params.pop("compress_statistics")
    rule = Rule(
        f"replace-{target_cls.__name__}",
        "linear-cell",
        {"to": _TARGETS[target_cls], **params},
        where={"exclude": ["lm_head", *(modules_to_not_convert or [])]},
        priority=100,
    )
    apply(model, RuleSet([rule]), verify=target_cls is not Linear8bit or not params["has_fp16_weights"])
    return model


def quantize_model_weights(model: nn.Cell) -> nn.Cell:
    """Switch every Linear8bit layer still in training mode to int8 inference (``quantize_weights``)."""
    count = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear8bit) and cell.has_fp16_weights:
            cell.quantize_weights()
            count += 1
    for name, param in model.parameters_and_names():
        param.name = name
    logger.info("quantize_model_weights: quantized %d Linear8bit layer(s)", count)
    return model


def get_model_size(model: nn.Cell) -> dict[str, Any]:
    """Parameter count and memory of a model (tied parameters once), with its quantized layers."""
    info = parameter_bytes(model)
    quantized = [name for name, cell in model.cells_and_names() if isinstance(cell, QuantLinear)]
    return {
        "num_params": info["num_params"],
        "total_bytes": info["bytes"],
        "size_mb": info["bytes"] / 2**20,
        "by_dtype": info["by_dtype"],
        "quantized_layers": len(quantized),
    }


def compare_model_sizes(fp_model: nn.Cell, quant_model: nn.Cell) -> dict[str, Any]:
    """Memory of a float model and its quantized version: sizes, compression ratio, saving."""
    fp, q = get_model_size(fp_model), get_model_size(quant_model)
    return {
        "fp_size_mb": fp["size_mb"],
        "quant_size_mb": q["size_mb"],
        "compression_ratio": fp["total_bytes"] / q["total_bytes"] if q["total_bytes"] else float("inf"),
        "memory_saving": 1.0 - q["total_bytes"] / fp["total_bytes"] if fp["total_bytes"] else 0.0,
        "saved_mb": fp["size_mb"] - q["size_mb"],
        "quantized_layers": q["quantized_layers"],
    }


__all__ = [
    "PassResult",
    "compare_model_sizes",
    "convert_to_quantized_model",
    "get_model_size",
    "quantize_model_weights",
    "replace_linear_layers",
]
