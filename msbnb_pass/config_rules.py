"""Mapping a BitsAndBytesConfig or the seed's QuantConfig onto rules of the built-in families.

This module sits above both ``config`` and ``rules`` (it imports them; neither imports it), which keeps
the package's import graph free of cycles. ``resolve_rules`` is what ``apply`` and the CLI call: it
accepts configs as well as everything ``rules.as_ruleset`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import DEFAULT_SKIP_MODULES, BitsAndBytesConfig, QuantConfig
from .errors import ConfigError
from .rules import Rule, RuleSet, as_ruleset

__all__ = ["resolve_rules", "rules_for_config", "skip_origins"]


def rules_for_config(config: BitsAndBytesConfig | QuantConfig, backend: str | None = None) -> RuleSet:
    """The RuleSet that quantizes what ``config`` describes, skipping its modules (the head included)."""
    if isinstance(config, BitsAndBytesConfig):
        if not config.is_quantizable():
            raise ConfigError(
                "this BitsAndBytesConfig quantizes nothing (load_in_8bit and load_in_4bit are both False)"
            )
        quant = config.to_quant_config()
    elif isinstance(config, QuantConfig):
        quant = config
    else:
        raise TypeError(f"config must be a BitsAndBytesConfig or QuantConfig, got {type(config).__name__}")
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
    base = RuleSet.builtin(family)
    skip = {"exclude": list(quant.skip_modules)} if quant.skip_modules else {}
    rules = [r.with_changes(rewrite=params) for r in base]
    if skip or quant.quantize_lm_head:  # the families' own rules exclude lm_head: replace that condition
        rules = [Rule(r.name, r.pattern, r.rewrite, skip, r.priority, r.description, r.source, r.line) for r in rules]
    if quant.quantize_embeddings:
        rules.append(_embedding_rule(family, quant, skip))
    return base.copy(rules)


def _embedding_rule(family: str, quant: QuantConfig, where: dict) -> Rule:
    """The opt-in rule for lookup tables in the config's format (``QuantConfig.quantize_embeddings``)."""
    if quant.bits == 8:
        rewrite: dict[str, Any] = {"to": "embedding8bit"}
    else:
        rewrite = {
            "to": "embedding4bit",
            "quant_type": quant.quant_type,
            "blocksize": quant.group_size,
            "double_quant": quant.compress_statistics,
            "symmetric": quant.symmetric,
        }
    return Rule(
        f"{family}-embedding",
        "embedding-cell",
        rewrite,
        dict(where),
        100,
        "lookup tables (QuantConfig.quantize_embeddings)",
        "QuantConfig",
    )


def skip_origins(config: Any) -> dict[str, str]:
    """For a config: each skipped-module pattern -> the setting it comes from (for messages)."""
    if isinstance(config, BitsAndBytesConfig):
        user, field = config.llm_int8_skip_modules or [], "llm_int8_skip_modules"
    elif isinstance(config, QuantConfig):
        user, field = config.modules_to_not_convert or [], "modules_to_not_convert"
    else:
        return {}
    out = {m: "the default skip of the output head" for m in DEFAULT_SKIP_MODULES}
    out.update({m: field for m in user})
    return out


def resolve_rules(spec: Any, *, allow_imports: Sequence[str] = ()) -> RuleSet:
    """A RuleSet from anything describing rules: a RuleSet, Rule(s), a family name, a TOML path, or a
    BitsAndBytesConfig / QuantConfig (also inside a list)."""
    if isinstance(spec, (BitsAndBytesConfig, QuantConfig)):
        return rules_for_config(spec)
    if isinstance(spec, (list, tuple)):
        out = RuleSet()
        for item in spec:
            out = out + resolve_rules(item, allow_imports=allow_imports)
        return out
    return as_ruleset(spec, allow_imports=allow_imports)
