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


def _finish(layer, view: LinearView):
    layer._set_activation(view.activation)
    return layer


def _scheme_4bit(p: dict) -> str:
    return p["quant_type"] + ("_asym" if not p["symmetric"] else "")


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

    layer = Linear4bit(
        view.in_features,
        view.out_features,
        view.bias is not None,
        quant_type,
        blocksize,
        double_quant,
        compute_dtype,
        symmetric=symmetric,
        weight=view.weight,
        bias_value=view.bias,
        backend=backend,
        layer_name=view.path or None,
    )
    return _finish(layer, view)


@register_replacement(
    "linear8bit",
    params={"symmetric": True, "per_channel": True, "has_fp16_weights": False, "backend": None},
    scheme=lambda p: "int8" if p["symmetric"] else "int8_asym",
)
def linear8bit(view: LinearView, symmetric, per_channel, has_fp16_weights, backend):
    from .nn import Linear8bit

    layer = Linear8bit(
        view.in_features,
        view.out_features,
        view.bias is not None,
        has_fp16_weights=has_fp16_weights,
        symmetric=symmetric,
        per_channel=per_channel,
        weight=view.weight,
        bias_value=view.bias,
        backend=backend,
        layer_name=view.path or None,
    )
    return _finish(layer, view)


@register_replacement(
    "linear8bitlt",
    params={"threshold": 6.0, "has_fp16_weights": False, "backend": None},
    scheme="llm_int8",
)
def linear8bitlt(view: LinearView, threshold, has_fp16_weights, backend):
    from .nn import Linear8bitLt

    layer = Linear8bitLt(
        view.in_features,
        view.out_features,
        view.bias is not None,
        has_fp16_weights,
        threshold,
        weight=view.weight,
        bias_value=view.bias,
        backend=backend,
        layer_name=view.path or None,
    )
    return _finish(layer, view)
