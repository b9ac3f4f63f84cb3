"""The built-in replacements: a float Linear (as a LinearView) -> a quantized cell.

Registered by name for rules (``rewrite = { to = "linear4bit", ... }``); users add theirs with
``msbnb_pass.register_replacement``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .rules import register_replacement


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


def _scheme_4bit(p: dict) -> str:
    return p["quant_type"] + ("_asym" if not p["symmetric"] else "")


def _from_view(cls, view: LinearView, **kwargs):
    return cls.from_float(view.weight, view.bias, view.activation, view.path or None, **kwargs)


@register_replacement(
    "linear4bit",
    params={
        "quant_type": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "compute_dtype": "float32",
        "symmetric": True,
        "backend": None,
    },
    scheme=_scheme_4bit,
)
def linear4bit(view: LinearView, quant_type, blocksize, double_quant, compute_dtype, symmetric, backend):
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


@register_replacement(
    "linear8bit",
    params={
        "symmetric": True,
        "per_channel": True,
        "has_fp16_weights": False,
        "compute_dtype": "float32",
        "backend": None,
    },
    scheme=lambda p: "int8" if p["symmetric"] else "int8_asym",
)
def linear8bit(view: LinearView, symmetric, per_channel, has_fp16_weights, compute_dtype, backend):
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


@register_replacement(
    "linear8bitlt",
    params={"threshold": 6.0, "has_fp16_weights": False, "backend": None},
    scheme="llm_int8",
)
def linear8bitlt(view: LinearView, threshold, has_fp16_weights, backend):
    from .nn import Linear8bitLt

    return _from_view(Linear8bitLt, view, threshold=threshold, has_fp16_weights=has_fp16_weights, backend=backend)
