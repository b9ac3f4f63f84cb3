"""Mapping a BitsAndBytesConfig or the seed's QuantConfig onto rules of the built-in families."""

from __future__ import annotations

from .config import BitsAndBytesConfig, QuantConfig
from .rules import RuleSet


def rules_for_config(config: BitsAndBytesConfig | QuantConfig, backend: str | None = None) -> RuleSet:
    """The RuleSet that quantizes what ``config`` describes, skipping its modules (the head included)."""
    if isinstance(config, BitsAndBytesConfig):
        if not config.is_quantizable():
            raise ValueError("this BitsAndBytesConfig quantizes nothing (load_in_8bit and load_in_4bit are both False)")
        quant = config.to_quant_config()
    else:
        quant = config
    if quant.bits == 8 and quant.llm_int8:
        family, params = "llm_int8", {"threshold": quant.threshold, "has_fp16_weights": quant.has_fp16_weights}
    elif quant.bits == 8:
        family, params = "int8", {"symmetric": quant.symmetric, "per_channel": quant.per_channel}
        if quant.compute_dtype != "float32":
            params["compute_dtype"] = quant.compute_dtype
    else:
        family = quant.quant_type if quant.quant_type in ("nf4", "fp4", "int4") else "int4"
        params = {
            "quant_type": quant.quant_type,
            "blocksize": quant.group_size,
            "double_quant": quant.compress_statistics,
            "compute_dtype": quant.compute_dtype,
            "symmetric": quant.symmetric,
        }
    if backend is not None:
        params["backend"] = backend
    rules = RuleSet.builtin(family)
    for rule in rules:
        rule.rewrite.update(params)
        rule.where["exclude"] = list(quant.skip_modules)
    return rules
