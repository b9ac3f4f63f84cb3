"""The built-in replacements: a float Linear (as a LinearView) or lookup table (an EmbeddingView) -> a
quantized cell.

A ``Replacement`` is a named factory with the parameters it accepts, their defaults, a validator that
refuses bad values when a rule is *loaded* (not when the first layer is built) and the scheme name used
for reports and verification bounds. The built-in ones are a plain, immutable table
(``BUILTIN_REPLACEMENTS``); nothing is registered at import time. Users add theirs to a RuleSet they own
with ``ruleset.register_replacement(...)``.

This module imports only numpy and the numpy formats at import time; the cells are imported when a
replacement is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .formats._checks import VALID_BLOCKSIZES
from .formats.codebooks import QUANT_TYPES_4BIT

BACKENDS = ("cpu", "reference")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16", "int8")
ROUNDINGS = ("nearest", "gptq")  # round-to-nearest, or GPTQ's calibrated codes (needs calibration samples)


@dataclass
class LinearView:
    """A float linear layer in one canonical form: ``y = activation(x @ weight.T + bias)``."""

    path: str
    weight: np.ndarray  # float32 [out_features, in_features]
    bias: np.ndarray | None
    activation: Any = None  # an activation Cell applied after the matmul, or None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class EmbeddingView:
    """A float lookup table ``[num_embeddings, embedding_dim]``: ``y = weight[ids]``."""

    path: str
    weight: np.ndarray  # float32 [num_embeddings, embedding_dim]
    bias: None = None
    activation: None = None

    @property
    def in_features(self) -> int:  # the one-hot view: ids in [0, num_embeddings)
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])


def _no_check(params: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Replacement:
    """A named factory: ``build(view, **params) -> quantized Linear cell``.

    ``params`` maps every accepted parameter to its default; ``scheme(params)`` names the quantization
    scheme (reports, default verification bounds); ``validate(params)`` raises ValueError naming the
    parameter, its value and what is accepted. ``kind`` is what it replaces: "linear" (built from a
    ``LinearView``) or "embedding" (built from an ``EmbeddingView``).
    """

    name: str
    build: Callable[..., Any]
    params: Mapping[str, Any]
    scheme: Callable[[dict], str]
    validate: Callable[[Mapping[str, Any]], None] = field(default=_no_check)
    kind: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


def make_replacement(
    name: str,
    build: Callable[..., Any],
    params: Mapping[str, Any],
    scheme: Callable[[dict], str] | str,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
) -> Replacement:
    """A Replacement; ``scheme`` may be a fixed name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a replacement needs a non-empty name, got {name!r}")
    if not callable(build):
        raise TypeError(f"replacement {name!r}: build must be callable, got {type(build).__name__}")
    scheme_fn = scheme if callable(scheme) else _fixed_scheme(str(scheme))
    return Replacement(name, build, dict(params), scheme_fn, validate or _no_check)


def _fixed_scheme(name: str) -> Callable[[dict], str]:
    def scheme(params: dict) -> str:
        return name

    return scheme


# ---- validation of rule parameters ------------------------------------------------------------------------
def _one_of(key: str, value: Any, accepted: tuple) -> None:
    if isinstance(value, bool) or value not in accepted:
        raise ValueError(f"rewrite.{key} = {value!r} is not accepted; accepted: {list(accepted)}")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"rewrite.{key} must be true or false, got {value!r}")


def _backend(value: Any) -> None:
    if value is not None and value not in BACKENDS:
        raise ValueError(f"rewrite.backend = {value!r} is not accepted; accepted: {list(BACKENDS)}")


def _rounding(p: Mapping[str, Any]) -> None:
    _one_of("rounding", p["rounding"], ROUNDINGS)


def _validate_4bit(p: Mapping[str, Any]) -> None:
    _rounding(p)
    _one_of("quant_type", p["quant_type"], QUANT_TYPES_4BIT)
    _one_of("blocksize", p["blocksize"], VALID_BLOCKSIZES)
    _bool("double_quant", p["double_quant"])
    _one_of("compute_dtype", p["compute_dtype"], COMPUTE_DTYPES)
    _bool("symmetric", p["symmetric"])
    if not p["symmetric"] and p["quant_type"] != "int4":
        raise ValueError(f"rewrite.symmetric = false is only defined for quant_type 'int4', got {p['quant_type']!r}")
    if p["compute_dtype"] == "int8" and not p["symmetric"]:
        raise ValueError("rewrite.compute_dtype = 'int8' needs symmetric = true (asymmetric int4 is not supported)")
    _backend(p["backend"])


def _validate_8bit(p: Mapping[str, Any]) -> None:
    _rounding(p)
    for key in ("symmetric", "per_channel", "has_fp16_weights"):
        _bool(key, p[key])
    _one_of("compute_dtype", p["compute_dtype"], COMPUTE_DTYPES)
    if p["compute_dtype"] == "int8" and not p["symmetric"]:
        raise ValueError("rewrite.compute_dtype = 'int8' needs symmetric = true (asymmetric int8 is not supported)")
    _backend(p["backend"])


def _validate_llm_int8(p: Mapping[str, Any]) -> None:
    _rounding(p)
    t = p["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"rewrite.threshold must be a finite number >= 0 (0 disables outliers), got {t!r}")
    _bool("has_fp16_weights", p["has_fp16_weights"])
    _backend(p["backend"])


def _validate_embedding4bit(p: Mapping[str, Any]) -> None:
    _one_of("quant_type", p["quant_type"], QUANT_TYPES_4BIT)
    _one_of("blocksize", p["blocksize"], VALID_BLOCKSIZES)
    _bool("double_quant", p["double_quant"])
    _bool("symmetric", p["symmetric"])
    if not p["symmetric"] and p["quant_type"] != "int4":
        raise ValueError(f"rewrite.symmetric = false is only defined for quant_type 'int4', got {p['quant_type']!r}")


# ---- the built-in factories ---------------------------------------------------------------------------------
def _scheme_4bit(p: dict) -> str:
    return p["quant_type"] + ("_asym" if not p["symmetric"] else "")


def _scheme_8bit(p: dict) -> str:
    return "int8" if p["symmetric"] else "int8_asym"


def _from_view(cls, view: LinearView, **kwargs):
    return cls.from_float(view.weight, view.bias, view.activation, view.path or None, **kwargs)


# ``rounding`` is "nearest" here: the pass builds gptq-rounded layers itself (msbnb_pass.calibrate), since
# they need the layer's calibration activations
def linear4bit(
    view: LinearView, quant_type, blocksize, double_quant, compute_dtype, symmetric, backend, rounding="nearest"
):
    from .nn import Linear4bit

    return _from_view(
        Linear4bit,
        view,
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=double_quant,
        compute_dtype=compute_dtype,
        symmetric=symmetric,
        backend=backend,
    )


def linear8bit(
    view: LinearView, symmetric, per_channel, has_fp16_weights, backend, compute_dtype="float32", rounding="nearest"
):
    from .nn import Linear8bit

    return _from_view(
        Linear8bit,
        view,
        has_fp16_weights=has_fp16_weights,
        symmetric=symmetric,
        per_channel=per_channel,
        compute_dtype=compute_dtype,
        backend=backend,
    )


def linear8bitlt(view: LinearView, threshold, has_fp16_weights, backend, rounding="nearest"):
    from .nn import Linear8bitLt

    return _from_view(Linear8bitLt, view, threshold=threshold, has_fp16_weights=has_fp16_weights, backend=backend)


def embedding4bit(view: EmbeddingView, quant_type, blocksize, double_quant, symmetric):
    from .nn import Embedding4bit

    return Embedding4bit.from_float(
        view.weight,
        view.path or None,
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=double_quant,
        symmetric=symmetric,
    )


def embedding8bit(view: EmbeddingView):
    from .nn import Embedding8bit

    return Embedding8bit.from_float(view.weight, view.path or None)


BUILTIN_REPLACEMENTS: Mapping[str, Replacement] = MappingProxyType(
    {
        "linear4bit": Replacement(
            "linear4bit",
            linear4bit,
            {
                "quant_type": "nf4",
                "blocksize": 64,
                "double_quant": True,
                "compute_dtype": "float32",
                "symmetric": True,
                "backend": None,
                "rounding": "nearest",
            },
            _scheme_4bit,
            _validate_4bit,
        ),
        "linear8bit": Replacement(
            "linear8bit",
            linear8bit,
            {
                "symmetric": True,
                "per_channel": True,
                "has_fp16_weights": False,
                "compute_dtype": "float32",
                "backend": None,
                "rounding": "nearest",
            },
            _scheme_8bit,
            _validate_8bit,
        ),
        "linear8bitlt": Replacement(
            "linear8bitlt",
            linear8bitlt,
            {"threshold": 6.0, "has_fp16_weights": False, "backend": None, "rounding": "nearest"},
            _fixed_scheme("llm_int8"),
            _validate_llm_int8,
        ),
        # lookup tables (pattern "embedding-cell"); bitsandbytes' Embedding4bit has no double quant by default
        "embedding4bit": Replacement(
            "embedding4bit",
            embedding4bit,
            {"quant_type": "nf4", "blocksize": 64, "double_quant": False, "symmetric": True},
            _scheme_4bit,
            _validate_embedding4bit,
            kind="embedding",
        ),
        "embedding8bit": Replacement(
            "embedding8bit", embedding8bit, {}, _fixed_scheme("int8"), _no_check, kind="embedding"
        ),
    }
)
