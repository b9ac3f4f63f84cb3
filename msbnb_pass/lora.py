"""LoRA and QLoRA: low-rank adapters on float, 8-bit and 4-bit Linear layers.

peft's LoRA, in MindSpore terms (facts and algorithms only, no code copied):

* forward: ``y = base(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = lora_alpha / r``;
* initialisation: ``lora_A`` kaiming-uniform with ``a = sqrt(5)`` (bound ``1 / sqrt(in_features)``),
  ``lora_B`` zeros, so a freshly wrapped layer computes exactly what its base computes;
* the wrapped layer keeps its base as ``<path>.base_layer`` and the adapters as ``<path>.lora_A.weight``
  ``[r, in]`` and ``<path>.lora_B.weight`` ``[out, r]`` (peft's names without the adapter name);
* adapters on disk: ``adapter_model.safetensors`` with keys ``base_model.model.<path>.lora_A.weight`` /
  ``.lora_B.weight`` and ``adapter_config.json`` with peft's fields, so adapters move both ways.

Composition with quantization: LoRA is a stage of the pass. ``apply(net, ["nf4", LoraConfig(...)])`` (or
the built-in family ``"lora"``, or a TOML file with a ``[lora]`` table) quantizes with the rules and then,
inside the same transaction, wraps the targeted layers, quantized or not, with adapters: one pass, one
network, and a failure anywhere rolls back everything. ``get_qlora_model(net, config, rules="nf4")``
(``msbnb_pass.passes``) is that call. (The rule engine rewrites one layer with one rule; the adapters wrap
whatever that rule produced, so they are a stage after the rules rather than a second rule on the layer.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from .errors import CheckpointError, ConfigError, MsbnbError, closest
from .nn import Linear4bit, Linear8bit, Linear8bitLt
from .nn._base import QuantLinear

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "Linear4bitWithLoRA",
    "Linear8bitWithLoRA",
    "LoRALinear",
    "LoraConfig",
    "LoraLayer",
    "LoraError",
    "add_lora",
    "freeze_model_except_lora",
    "lora_config_from_toml",
    "lora_targets",
    "split_lora_spec",
    "load_lora_adapters",
    "lora_layers",
    "merge_lora",
    "prepare_model_for_kbit_training",
    "print_lora_info",
    "save_lora_adapters",
    "unmerge_lora",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BIAS_MODES = ("none",)


class LoraError(MsbnbError):
    """A LoRA configuration, target or adapter file that cannot be used."""


def _positive(name: str, value: Any, kind: type = int) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else (int, np.integer))
    if not ok or not value > 0 or (kind is float and not math.isfinite(float(value))):
        what = "a positive integer" if kind is int else "a positive finite number"
        raise LoraError(f"{name} must be {what}, got {value!r}")
    return kind(value)


def _dropout_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise LoraError(f"lora_dropout must be a number in [0, 1), got {value!r}")
    return float(value)


# ---- configuration --------------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    """peft's LoraConfig fields that this implementation honours.

    ``target_modules``: a list of module names, each matching a layer whose path equals it or ends with
    ``"." + name`` (peft's rule: ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); or one string,
    a regular expression that must match the whole path (``re.fullmatch``); or ``"all-linear"`` (every
    Linear-like layer except the output head ``lm_head``); None means "all-linear".
    ``bias`` must be "none" (bias training modes are not implemented).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        self.r = _positive("r", self.r, int)
        alpha = self.lora_alpha
        self.lora_alpha = _positive("lora_alpha", alpha, float)
        if float(alpha).is_integer():
            self.lora_alpha = int(alpha)
        self.lora_dropout = _dropout_value(self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise LoraError(f"bias = {self.bias!r} is not supported; accepted: {list(BIAS_MODES)}")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as exc:
                    raise LoraError(f"target_modules = {tm!r} is not a valid regular expression: {exc}") from None
        elif tm is not None:
            if isinstance(tm, (set, tuple)):
                tm = sorted(tm)
            if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise LoraError(
                    f"target_modules must be a non-empty list of module names, a regex string or 'all-linear', "
                    f"got {self.target_modules!r}"
                )
            self.target_modules = list(tm)

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r

    def matches(self, path: str) -> bool:
        """Is the layer at ``path`` a target (peft's matching)?"""
        tm = self.target_modules
        if tm is None or tm == "all-linear":
            return not any(path == e or path.endswith("." + e) for e in self.exclude_modules)
        if isinstance(tm, str):
            return re.fullmatch(tm, path) is not None
        return any(path == t or path.endswith("." + t) for t in tm)

    def to_peft_dict(self) -> dict[str, Any]:
        """The fields of peft's ``adapter_config.json``."""
        return {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": self.target_modules,
            "task_type": self.task_type,
            "use_dora": False,
            "use_rslora": False,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read peft's ``adapter_config.json`` (refusing the variants this implementation does not compute)."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(f"adapter_config.json: peft_type = {data.get('peft_type')!r}; accepted: ['LORA']")
        for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
            if data.get(key):
                raise LoraError(f"adapter_config.json: {key} = {data[key]!r} is not supported (only plain LoRA)")
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key):
                raise LoraError(f"adapter_config.json: a non-empty {key} is not supported, got {data[key]!r}")
        tm = data.get("target_modules")
        return cls(
            r=data.get("r", 8),
            lora_alpha=data.get("lora_alpha", 8),
            lora_dropout=data.get("lora_dropout", 0.0),
            target_modules=tm,
            bias=data.get("bias", "none"),
            task_type=data.get("task_type"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )


# ---- the cells ------------------------------------------------------------------------------------------------
def _is_linear(cell: nn.Cell) -> bool:
    from mindspore import mint

    return isinstance(cell, (nn.Dense, mint.nn.Linear, QuantLinear))


def _features(cell: nn.Cell) -> tuple[int, int]:
    if isinstance(cell, QuantLinear):
        return cell.in_features, cell.out_features
    shape = tuple(cell.weight.shape)
    return int(shape[1]), int(shape[0])


def _has_activation(cell: nn.Cell) -> bool:
    return bool(getattr(cell, "activation_flag", False))


class LoraLayer(nn.Cell):
    """A Linear-like ``base_layer`` plus a trainable low-rank update:
    ``y = base_layer(x) + lora_B(lora_A(dropout(x))) * (lora_alpha / r)``.

    The base is frozen (``requires_grad=False`` on its parameters) when the layer is built."""

    def __init__(
        self,
        base_layer: nn.Cell,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        *,
        freeze_base: bool = True,
    ):
        super().__init__()
        r = _positive("r", r, int)
        alpha = _positive("lora_alpha", lora_alpha, float)
        dropout = _dropout_value(lora_dropout)
        if not _is_linear(base_layer):
            raise LoraError(
                f"LoRA needs a Linear-like base layer (nn.Dense, mint.nn.Linear, Linear4bit, Linear8bit, "
                f"Linear8bitLt), got {type(base_layer).__name__}"
            )
        if _has_activation(base_layer):
            raise LoraError(
                "LoRA adds its update to the linear output; a base layer with a fused activation "
                f"({type(base_layer.activation).__name__}) would apply it to the base part only"
            )
        self.in_features, self.out_features = _features(base_layer)
        if r > min(self.in_features, self.out_features):
            logger.warning(
                "LoRA rank r=%d exceeds min(in_features, out_features)=%d: the update is not low-rank",
                r,
                min(self.in_features, self.out_features),
            )
        self.r = r
        self.lora_alpha = int(alpha) if alpha.is_integer() else alpha
        self.lora_dropout_p = dropout
        self.scaling = float(alpha) / r
        self.base_layer = base_layer
        a = initializer(HeUniform(math.sqrt(5)), [r, self.in_features], ms.float32).init_data().asnumpy()
        self.lora_A = nn.Dense(self.in_features, r, weight_init=Tensor(a.astype(np.float32)), has_bias=False)
        self.lora_B = nn.Dense(r, self.out_features, weight_init="zeros", has_bias=False)
        self._matmul = ops.MatMul(transpose_b=True)
        self.use_dropout = dropout > 0.0
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.merged = False
        self._merged_b: np.ndarray | None = None  # lora_B's values while merged (the parameter holds zeros)
        if freeze_base:
            for p in base_layer.get_parameters():
                p.requires_grad = False

    def construct(self, x):
        # no branch on ``merged``: a graph compiled before a merge would keep the branch it saw. While
        # merged, lora_B holds zeros (its values wait in ``_merged_b``), so the adapter adds exactly 0.
        y = self.base_layer(x)
        h = x
        if self.use_dropout:
            h = self.lora_dropout(h)
        # two 2-D matmuls on the adapters' weights (lora_A / lora_B keep the Dense cells for the
        # parameter names): fewer graph nodes than two nn.Dense calls, each with its reshapes
        delta = self._matmul(self._matmul(h.reshape(-1, self.in_features), self.lora_A.weight), self.lora_B.weight)
        return y + ops.cast(delta * self.scaling, y.dtype).reshape(y.shape)

    # ---- python side ---------------------------------------------------------------------------------------
    def delta_weight(self) -> np.ndarray:
        """``B @ A * scaling`` as float32 ``[out, in]`` (float64 product, rounded once)."""
        a = self.lora_A.weight.asnumpy().astype(np.float64)
        b = (self._merged_b if self.merged else self.lora_B.weight.asnumpy()).astype(np.float64)
        return (b @ a * self.scaling).astype(np.float32)

    def _set_merged(self, merged: bool) -> None:
        """Mark the adapter folded into the base (lora_B's values set aside, zeros in the parameter) or not."""
        b = self.lora_B.weight
        if merged and not self.merged:
            self._merged_b = b.asnumpy().copy()
            b.set_data(Tensor(np.zeros(b.shape, np.float32)))
        elif not merged and self.merged:
            b.set_data(Tensor(self._merged_b))
            self._merged_b = None
        self.merged = merged

    def extend_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"

    @classmethod
    def _from_base(cls, base: nn.Cell, r: int, lora_alpha: float, lora_dropout: float) -> LoraLayer:
        obj = cls.__new__(cls)
        LoraLayer.__init__(obj, base, r, lora_alpha, lora_dropout)
        return obj


class LoRALinear(LoraLayer):
    """LoRA on a float ``nn.Dense`` base: ``LoRALinear(768, 3072, r=8, lora_alpha=16)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
    ):
        base = nn.Dense(in_features, out_features, has_bias=bias)
        super().__init__(base, r, lora_alpha, lora_dropout)

    @classmethod
    def from_linear(cls, layer: nn.Cell, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing float Linear layer (kept as is, frozen)."""
        return cls._from_base(layer, r, lora_alpha, lora_dropout)


class Linear4bitWithLoRA(LoraLayer):
    """QLoRA's layer: a frozen 4-bit base (NF4 + double quantization by default) plus float32 adapters.

    ``Linear4bitWithLoRA(768, 3072, r=8, lora_alpha=16)`` quantizes a randomly initialised weight;
    ``Linear4bitWithLoRA.from_linear(dense, r=8)`` quantizes an ``nn.Dense`` (or wraps a ``Linear4bit``).
    ``quant_kwargs`` go to ``Linear4bit`` (quant_type, blocksize, compress_statistics, compute_dtype)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        **quant_kwargs: Any,
    ):
        base = Linear4bit(in_features, out_features, bias, **quant_kwargs)
        super().__init__(base, r, lora_alpha, lora_dropout)

    @classmethod
    def from_linear(
        cls, layer: nn.Cell, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, **quant_kwargs: Any
    ) -> Linear4bitWithLoRA:
        if not isinstance(layer, Linear4bit):
            layer = Linear4bit.from_dense(layer, **quant_kwargs)
        elif quant_kwargs:
            raise LoraError(f"from_linear: the layer is already a Linear4bit; got quantization options {quant_kwargs}")
        return cls._from_base(layer, r, lora_alpha, lora_dropout)


class Linear8bitWithLoRA(LoraLayer):
    """A frozen int8 base (``Linear8bit``, or ``Linear8bitLt`` when given one) plus float32 adapters."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        **quant_kwargs: Any,
    ):
        quant_kwargs.setdefault("has_fp16_weights", False)
        base = Linear8bit(in_features, out_features, bias, **quant_kwargs)
        super().__init__(base, r, lora_alpha, lora_dropout)

    @classmethod
    def from_linear(
        cls, layer: nn.Cell, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, **quant_kwargs: Any
    ) -> Linear8bitWithLoRA:
        if not isinstance(layer, (Linear8bit, Linear8bitLt)):
            layer = Linear8bit.from_dense(layer, **quant_kwargs)
        elif quant_kwargs:
            raise LoraError(f"from_linear: the layer is already quantized; got quantization options {quant_kwargs}")
        return cls._from_base(layer, r, lora_alpha, lora_dropout)


def _lora_class(base: nn.Cell) -> type[LoraLayer]:
    if isinstance(base, Linear4bit):
        return Linear4bitWithLoRA
    if isinstance(base, (Linear8bit, Linear8bitLt)):
        return Linear8bitWithLoRA
    if isinstance(base, QuantLinear):
        return LoraLayer
    return LoRALinear


# ---- whole networks -----------------------------------------------------------------------------------------
def lora_layers(net: nn.Cell) -> dict[str, LoraLayer]:
    """Path -> LoRA layer, in tree order."""
    return {name: cell for name, cell in net.cells_and_names() if isinstance(cell, LoraLayer)}


def _rename(net: nn.Cell) -> None:
    for name, p in net.parameters_and_names():
        if p.name != name:
            p.name = name


def _linear_targets(net: nn.Cell, config: LoraConfig) -> dict[str, nn.Cell]:
    """The Linear-like layers ``config`` selects (path -> cell), outside existing LoRA layers. Raises
    ``LoraError`` listing the close names when nothing matches, or naming a target that cannot take LoRA."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    inside_lora = set()
    linears: dict[str, nn.Cell] = {}
    for name, cell in net.cells_and_names():
        if isinstance(cell, LoraLayer):
            inside_lora.update(f"{name}.{c}" for c in ("base_layer", "lora_A", "lora_B"))
        elif _is_linear(cell) and name not in inside_lora and name:
            linears[name] = cell
    targets = {p: c for p, c in linears.items() if config.matches(p)}
    if not targets:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        wanted = config.target_modules if isinstance(config.target_modules, list) else [config.target_modules]
        hints = sorted({c for w in wanted if isinstance(w, str) for c in closest(w, leaf_names)})
        raise LoraError(
            f"target_modules = {config.target_modules!r} matches no Linear-like layer; "
            f"{'close names: ' + str(hints) + '; ' if hints else ''}the layers are named {leaf_names}"
        )
    for path, cell in targets.items():
        if _has_activation(cell):
            raise LoraError(f"{path}: a layer with a fused activation cannot take a LoRA update (target it out)")
    return targets


def lora_targets(net: nn.Cell, config: LoraConfig) -> list[str]:
    """The paths ``add_lora(net, config)`` would wrap (the same checks and errors; nothing changes)."""
    return list(_linear_targets(net, config))


def add_lora(net: nn.Cell, config: LoraConfig, transaction: Any = None) -> list[str]:
    """Wrap every Linear-like layer of ``net`` that ``config.target_modules`` selects with a LoRA layer
    (float, 8-bit and 4-bit bases alike), freeze everything but the adapters, name every parameter after
    its tree path; returns the wrapped paths. Nothing changes when a target is refused.

    ``transaction``: a ``rewrite.Transaction`` to record the edits in (the pass gives its own, so that a
    later failure rolls the adapters back with everything else); the parameter names are then left to the
    caller's renaming."""
    from .rewrite import _cell_at, _set_child, forget_compiled_graphs

    targets = _linear_targets(net, config)
    flags = [(p, p.requires_grad) for _, p in net.parameters_and_names()]
    if transaction is not None:

        def restore() -> None:
            for p, flag in flags:
                p.requires_grad = flag

        transaction.undo.append(restore)
    new_layers = {
        path: _lora_class(cell)._from_base(cell, config.r, config.lora_alpha, config.lora_dropout)
        for path, cell in targets.items()
    }
    for path, layer in new_layers.items():
        parent_path, _, attr = path.rpartition(".")
        parent = _cell_at(net, parent_path)
        if transaction is not None:
            transaction.set_child(parent, attr, layer)
        else:
            _set_child(parent, attr, layer)
    freeze_model_except_lora(net)
    if transaction is None:
        _rename(net)
        forget_compiled_graphs(net)  # in a transaction the pass does this once, at its end
    elif "lora_config" in net.__dict__:
        old = net.__dict__["lora_config"]
        transaction.undo.append(lambda: setattr(net, "lora_config", old))
    else:
        transaction.undo.append(lambda: net.__dict__.pop("lora_config", None))
    net.lora_config = config
    logger.info("LoRA (r=%d, alpha=%s) added to %d layers", config.r, config.lora_alpha, len(targets))
    return list(targets)


# ---- LoRA as a stage of the pass ------------------------------------------------------------------------------
LORA_FAMILY = "lora"
LORA_TOML_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "exclude_modules", "task_type")


def lora_config_from_toml(source: str | os.PathLike, text: str | None = None) -> LoraConfig:
    """A LoraConfig from a TOML file holding one ``[lora]`` table (``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``bias``, ``exclude_modules``, ``task_type``); errors name the file and the key."""
    import tomllib

    from .errors import did_you_mean

    src = str(source)
    if text is None:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise LoraError(f"{src}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LoraError(f"{src}: not valid TOML: {exc}") from None
    if not isinstance(data.get("lora"), dict):
        raise LoraError(f"{src}: no [lora] table")
    other = sorted(set(data) - {"lora"})
    if other:
        raise LoraError(
            f"{src}: a LoRA file holds only the [lora] table, found also {other}; put quantization rules in "
            "their own file and pass both (apply(net, ['rules.toml', 'lora.toml']))"
        )
    table = data["lora"]
    for key in table:
        if key not in LORA_TOML_KEYS:
            raise LoraError(
                f"{src}: [lora]: unknown key {key!r}{did_you_mean(key, LORA_TOML_KEYS)}; "
                f"accepted: {list(LORA_TOML_KEYS)}"
            )
    try:
        return LoraConfig(**table)
    except LoraError as exc:
        raise LoraError(f"{src}: [lora]: {exc}") from None


def _is_lora_file(item: Any) -> bool:
    import tomllib

    if not isinstance(item, (str, os.PathLike)) or not str(item).endswith(".toml") or not Path(item).is_file():
        return False
    try:
        return "lora" in tomllib.loads(Path(item).read_text(encoding="utf-8"))
    except (OSError, UnicodeError, tomllib.TOMLDecodeError):
        return False  # not ours: the rule loader reports it


def split_lora_spec(spec: Any) -> tuple[Any, LoraConfig | None]:
    """Separate the LoRA part of a pass's rule spec: a ``LoraConfig``, the built-in family ``"lora"``
    (``rules/lora.toml``) or a TOML file with a ``[lora]`` table, alone or inside a list. Returns
    ``(the rest, the LoraConfig or None)``; more than one LoRA config is an error (a layer takes one)."""
    from .rules import _builtin_text

    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    rest: list[Any] = []
    found: list[LoraConfig] = []
    for item in items:
        if isinstance(item, LoraConfig):
            found.append(item)
        elif isinstance(item, str) and item == LORA_FAMILY:
            found.append(lora_config_from_toml("rules/lora.toml", _builtin_text("lora.toml")))
        elif _is_lora_file(item):
            found.append(lora_config_from_toml(item))
        else:
            rest.append(item)
    if len(found) > 1:
        raise LoraError(f"one LoRA config per pass (a layer takes one adapter), got {len(found)}")
    if not found:
        return spec, None
    return (rest if isinstance(spec, (list, tuple)) or not rest else rest[0]), found[0]


def freeze_model_except_lora(model: nn.Cell) -> int:
    """``requires_grad`` True on the LoRA parameters (``lora_A`` / ``lora_B``), False on every other one;
    returns the number of trainable parameter tensors."""
    n = 0
    for name, p in model.parameters_and_names():
        trainable = ".lora_A." in f".{name}" or ".lora_B." in f".{name}"
        p.requires_grad = trainable
        n += trainable
    return n


def _logical_count(cell_path: str, param: Parameter, cells: dict[str, nn.Cell]) -> int:
    """Parameter elements, counting packed 4-bit weights as two weights per byte (as peft does)."""
    owner = cells.get(cell_path)
    if isinstance(owner, Linear4bit) and param is owner.weight:
        return owner.in_features * owner.out_features
    return int(param.size)


def print_lora_info(model: nn.Cell, verbose: bool = True) -> dict[str, Any]:
    """Trainable vs total parameters and their bytes. Prints peft's ``print_trainable_parameters`` line
    (``trainable params: ... || all params: ... || trainable%: ...``) when ``verbose`` (the seed API prints),
    logs it at INFO otherwise; returns the numbers."""
    cells = dict(model.cells_and_names())
    trainable = total = trainable_bytes = total_bytes = 0
    seen: set[int] = set()
    for name, p in model.parameters_and_names():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count = _logical_count(name.rpartition(".")[0], p, cells)
        nbytes = int(p.size * p.itemsize)
        total += count
        total_bytes += nbytes
        if p.requires_grad:
            trainable += count
            trainable_bytes += nbytes
    info = {
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "trainable_bytes": trainable_bytes,
        "all_bytes": total_bytes,
        "lora_layers": len(lora_layers(model)),
    }
    line = (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {info['trainable_percent']:.4f}"
        f" || trainable bytes: {trainable_bytes:,d} || all bytes: {total_bytes:,d}"
    )
    if verbose:
        print(line)
    logger.info(line)
    return info


# ---- merging -------------------------------------------------------------------------------------------------
def _requantized_like(base: QuantLinear, w: np.ndarray) -> QuantLinear:
    """A layer of ``base``'s class and format holding ``w`` (quantized)."""
    bias = base.bias.asnumpy() if base.has_bias else None
    if isinstance(base, Linear4bit):
        return Linear4bit.from_float(
            w,
            bias,
            None,
            base.layer_name,
            quant_type=base.quant_type,
            blocksize=base.blocksize,
            compress_statistics=base.compress_statistics,
            compute_dtype=base.compute_dtype_name,
            symmetric=base.symmetric,
        )
    if isinstance(base, Linear8bitLt):
        return Linear8bitLt.from_float(w, bias, None, base.layer_name, threshold=base.threshold)
    if isinstance(base, Linear8bit):
        return Linear8bit.from_float(
            w,
            bias,
            None,
            base.layer_name,
            has_fp16_weights=False,
            symmetric=base.symmetric,
            per_channel=base.per_channel,
        )
    raise LoraError(f"cannot re-quantize a {type(base).__name__}")


def _base_weight(base: nn.Cell) -> np.ndarray:
    if isinstance(base, QuantLinear):
        return base.dequantized_weight().astype(np.float32)
    return base.weight.asnumpy().astype(np.float32)


def _write_base(base: nn.Cell, w: np.ndarray) -> float:
    """Store ``w`` in ``base`` (re-quantizing a quantized one in its own format); returns the relative
    Frobenius error the storage added, ``||stored - w|| / ||w||`` (0 for a float base)."""
    if not isinstance(base, QuantLinear):
        base.weight.set_data(Tensor(w.astype(np.float32)))
        return 0.0
    new = _requantized_like(base, w)
    mine = dict(base.parameters_and_names(expand=False))
    for attr, p in new.parameters_and_names(expand=False):
        if attr not in mine or tuple(mine[attr].shape) != tuple(p.shape):
            raise LoraError(f"re-quantizing {base.layer_name}: parameter {attr} changed shape")
    for attr, p in new.parameters_and_names(expand=False):
        mine[attr].set_data(Tensor(p.asnumpy()))
    stored = base.dequantized_weight().astype(np.float64)
    return float(np.linalg.norm(stored - w) / max(np.linalg.norm(w), 1e-30))


def merge_lora(model: nn.Cell) -> dict[str, dict[str, float]]:
    """Fold every adapter into its base: ``W <- W + B @ A * scaling`` (a 4-bit or 8-bit base is dequantized,
    added to and re-quantized in its own format). The adapters stay (zero contribution while merged);
    ``unmerge_lora`` undoes it. Returns per layer the relative error re-quantization added,
    ``requant_error = ||stored - (W + dW)|| / ||W + dW||`` (0 for float bases), and ``delta_norm``
    ``= ||dW|| / ||W||``. Refuses (changing nothing) when a layer is already merged."""
    layers = lora_layers(model)
    merged = [p for p, layer in layers.items() if layer.merged]
    if merged:
        raise LoraError(f"merge_lora: already merged: {merged[:5]}{' ...' if len(merged) > 5 else ''}; unmerge first")
    report = {}
    for path, layer in layers.items():
        w = _base_weight(layer.base_layer)
        d = layer.delta_weight()
        target = (w.astype(np.float64) + d).astype(np.float32)
        err = _write_base(layer.base_layer, target)
        layer._set_merged(True)
        report[path] = {"requant_error": err, "delta_norm": float(np.linalg.norm(d) / max(np.linalg.norm(w), 1e-30))}
        logger.info("merged %s: re-quantization error %.3e (delta %.3e)", path, err, report[path]["delta_norm"])
    return report


def unmerge_lora(model: nn.Cell) -> dict[str, dict[str, float]]:
    """Undo ``merge_lora``: ``W <- W - B @ A * scaling`` (re-quantized again for a quantized base, which
    does not give the original codes back: the error is reported as in ``merge_lora``)."""
    layers = lora_layers(model)
    not_merged = [p for p, layer in layers.items() if not layer.merged]
    if not_merged:
        raise LoraError(f"unmerge_lora: not merged: {not_merged[:5]}{' ...' if len(not_merged) > 5 else ''}")
    report = {}
    for path, layer in layers.items():
        w = _base_weight(layer.base_layer)
        d = layer.delta_weight()
        target = (w.astype(np.float64) - d).astype(np.float32)
        err = _write_base(layer.base_layer, target)
        layer._set_merged(False)
        report[path] = {"requant_error": err, "delta_norm": float(np.linalg.norm(d) / max(np.linalg.norm(w), 1e-30))}
    return report


def merge_and_unload(model: nn.Cell) -> dict[str, dict[str, float]]:
    """peft's ``merge_and_unload``: fold every adapter into its base (``merge_lora``, unless already merged)
    and put each base layer back in place of its LoRA wrapper, so that the network is a plain (quantized
    or float) network again. Returns ``merge_lora``'s per-layer report (empty when it was merged before).
    Parameters are renamed to their tree paths; ``model.lora_config`` is removed."""
    from .rewrite import _cell_at, _set_child, forget_compiled_graphs

    layers = lora_layers(model)
    if not layers:
        raise LoraError("merge_and_unload: the model has no LoRA layers")
    states = {layer.merged for layer in layers.values()}
    if len(states) > 1:
        raise LoraError("merge_and_unload: some LoRA layers are merged and some are not; merge or unmerge all first")
    report = {} if states == {True} else merge_lora(model)
    for path, layer in layers.items():
        parent_path, _, attr = path.rpartition(".")
        _set_child(_cell_at(model, parent_path), attr, layer.base_layer)
    if "lora_config" in model.__dict__:
        del model.__dict__["lora_config"]
    _rename(model)
    forget_compiled_graphs(model)
    return report


# ---- adapters on disk (peft's layout) ----------------------------------------------------------------------
def _config_of(model: nn.Cell, layers: dict[str, LoraLayer]) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if isinstance(cfg, LoraConfig):
        return cfg
    first = next(iter(layers.values()))
    return LoraConfig(
        r=first.r,
        lora_alpha=first.lora_alpha,
        lora_dropout=first.lora_dropout_p,
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in layers}),
    )


def save_lora_adapters(
    model: nn.Cell, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> dict[str, Path]:
    """Write the adapters only, in peft's layout: ``<directory>/adapter_model.safetensors`` (keys
    ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, float32) and ``adapter_config.json``.
    Both files are written atomically. Returns their paths."""
    from .io.safetensors_io import atomic_write, write_safetensors

    layers = lora_layers(model)
    if not layers:
        raise LoraError("save_lora_adapters: the model has no LoRA layers (add_lora / get_qlora_model first)")
    if any(layer.merged for layer in layers.values()):
        raise LoraError("save_lora_adapters: the adapters are merged into the base; unmerge_lora first")
    tensors = {}
    for path, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.asnumpy().astype(np.float32)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.asnumpy().astype(np.float32)
    config = _config_of(model, layers)
    data = config.to_peft_dict()
    if base_model_name_or_path is not None:
        data["base_model_name_or_path"] = base_model_name_or_path
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / ADAPTER_WEIGHTS_NAME
    write_safetensors(weights, tensors, metadata={"format": "pt"})
    cfg_path = out / ADAPTER_CONFIG_NAME
    atomic_write(cfg_path, [json.dumps(data, indent=2, sort_keys=True).encode()])
    return {"weights": weights, "config": cfg_path}


def load_lora_adapters(model: nn.Cell, directory: str | os.PathLike) -> list[str]:
    """Load adapters saved by ``save_lora_adapters`` or by peft into ``model``. A model without LoRA layers
    gets them first from the file's ``adapter_config.json`` (as peft's ``PeftModel.from_pretrained``).
    Every key and shape is checked before anything is written: a mismatch raises and changes nothing.
    Returns the loaded layer paths."""
    from .io.safetensors_io import SafetensorsFile

    src = Path(directory)
    cfg_path, w_path = src / ADAPTER_CONFIG_NAME, src / ADAPTER_WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"load_lora_adapters: {p} does not exist")
    try:
        config = LoraConfig.from_peft_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from None
    f = SafetensorsFile(w_path)
    values: dict[str, dict[str, np.ndarray]] = {}
    for key in f.keys():
        k = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight", k)
        if m is None:
            raise CheckpointError(f"{w_path}: {key!r} is not a LoRA adapter key (<path>.lora_A.weight)")
        values.setdefault(m.group(1), {})[m.group(2)] = f.get(key)
    layers = lora_layers(model)
    added: list[str] = []
    if not layers:
        # check the paths exist before wrapping anything
        have = {n for n, c in model.cells_and_names() if _is_linear(c)}
        missing = sorted(set(values) - have)
        if missing:
            raise CheckpointError(
                f"{w_path}: adapters for layers the model does not have: {missing[:5]}"
                f"{' (close: ' + str(closest(missing[0], have)) + ')' if closest(missing[0], have) else ''}"
            )
        _check_shapes(values, {p: _features(dict(model.cells_and_names())[p]) for p in values}, config.r, w_path)
        added = add_lora(model, config)
        layers = lora_layers(model)
    missing = sorted(set(values) - set(layers))
    if missing:
        raise CheckpointError(f"{w_path}: adapters for layers without LoRA in the model: {missing[:5]}")
    _check_shapes(values, {p: (layers[p].in_features, layers[p].out_features) for p in values}, None, w_path, layers)
    for path, ab in values.items():
        layers[path].lora_A.weight.set_data(Tensor(ab["lora_A"].astype(np.float32)))
        layers[path].lora_B.weight.set_data(Tensor(ab["lora_B"].astype(np.float32)))
    absent = sorted(set(layers) - set(values))
    if absent:
        logger.warning("load_lora_adapters: %d LoRA layers have no adapters in the file: %s", len(absent), absent[:5])
    logger.info("loaded LoRA adapters for %d layers from %s (%d layers added)", len(values), src, len(added))
    return sorted(values)


def _check_shapes(values, features, r, w_path, layers=None) -> None:
    for path, ab in values.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{w_path}: {path} needs both lora_A and lora_B, got {sorted(ab)}")
        fin, fout = features[path]
        rank = r if layers is None else layers[path].r
        want = {"lora_A": (rank, fin), "lora_B": (fout, rank)}
        for k, shape in want.items():
            got = tuple(ab[k].shape)
            if got != shape or ab[k].dtype.kind != "f":
                raise CheckpointError(
                    f"{w_path}: {PEFT_PREFIX}{path}.{k}.weight has {ab[k].dtype} {list(got)}, the model needs a "
                    f"float tensor of shape {list(shape)} (r={rank}, in={fin}, out={fout})"
                )


# ---- k-bit training preparation ------------------------------------------------------------------------------
def prepare_model_for_kbit_training(
    model: nn.Cell,
    use_gradient_checkpointing: bool = True,
    checkpoint_blocks: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """What peft's ``prepare_model_for_kbit_training`` does, in MindSpore terms:

    * freeze every parameter (adapters added afterwards are trainable; call it before ``add_lora`` or
      call ``freeze_model_except_lora`` after);
    * keep the normalisation layers' parameters (and any other non-quantized float16/bfloat16 parameter)
      in float32;
    * gradient checkpointing: ``Cell.recompute()`` on the chosen blocks (``checkpoint_blocks``: a regex
      matched against cell paths with ``re.fullmatch``, or a list of paths; default: every element of the
      first ``CellList`` in the model, e.g. the decoder layers).

    Returns ``{"frozen": n, "upcast": [...], "recomputed": [...]}``."""
    frozen = 0
    for _, p in model.parameters_and_names():
        if p.requires_grad:
            frozen += 1
        p.requires_grad = False
    upcast = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, QuantLinear):
            continue
        for attr, p in cell.parameters_and_names(expand=False):
            if p.dtype in (ms.float16, ms.bfloat16):
                # set_data keeps a Parameter's dtype: put a float32 Parameter of the same name in its place
                new = Parameter(ops.cast(p, ms.float32), name=p.name, requires_grad=False)
                cell._params[attr] = new
                upcast.append(f"{name}.{attr}" if name else attr)
    recomputed: list[str] = []
    if use_gradient_checkpointing:
        cells = dict(model.cells_and_names())
        if checkpoint_blocks is None:
            lists = [n for n, c in cells.items() if isinstance(c, nn.CellList) and len(c) > 0]
            if not lists:
                raise ConfigError(
                    "prepare_model_for_kbit_training: no CellList of blocks found; name the blocks to recompute "
                    "with checkpoint_blocks"
                )
            recomputed = [f"{lists[0]}.{i}" for i in range(len(cells[lists[0]]))]
        elif isinstance(checkpoint_blocks, str):
            recomputed = [n for n in cells if n and re.fullmatch(checkpoint_blocks, n)]
        else:
            recomputed = list(checkpoint_blocks)
        unknown = [n for n in recomputed if n not in cells]
        if unknown or not recomputed:
            raise ConfigError(
                f"prepare_model_for_kbit_training: checkpoint_blocks = {checkpoint_blocks!r} selects "
                f"{'unknown cells ' + str(unknown[:5]) if unknown else 'no cell'}"
            )
        for n in recomputed:
            cells[n].recompute()
    return {"frozen": frozen, "upcast": upcast, "recomputed": recomputed}
