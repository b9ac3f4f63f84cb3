"""Quantization configs: transformers' ``BitsAndBytesConfig`` and the seed's QuantConfig/Int8Config/Int4Config.

``BitsAndBytesConfig`` has every field, default and meaning of transformers' class and writes the same
``quantization_config`` JSON, so a config travels between the two libraries unchanged. It validates more
eagerly than transformers (bad quant types, negative thresholds, compute dtypes MindSpore cannot run on
CPU are refused here instead of deep inside a load).

The seed's configs describe the same choices in the seed's vocabulary (bits, symmetric, per_channel,
group_size) and can express formats bitsandbytes has no name for (asymmetric and per-tensor INT8, INT4,
other block sizes). ``to_bnb_config``/``from_bnb_config`` convert where a faithful mapping exists and
raise where it does not.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError, closest
from .formats._checks import VALID_BLOCKSIZES

logger = logging.getLogger(__name__)

BNB_QUANT_TYPES = ("fp4", "nf4")
QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")
# Compute dtypes of the quantized layers (MindSpore 2.10 has no bf16 MatMul on CPU: bfloat16 runs in the
# library's own kernels, AVX512-BF16 vdpbf16ps or its exact emulation). "int8" (activations quantized to int8
# on the fly, W4A8/W8A8) is this library's opt-in: the seed configs accept it; BitsAndBytesConfig does not,
# since transformers could not read such a config back.
CPU_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16", "int8")
KNOWN_COMPUTE_DTYPES = CPU_COMPUTE_DTYPES
QUANT_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
DEFAULT_SKIP_MODULES = ("lm_head",)


def dtype_to_str(value: Any) -> str:
    """Normalise a dtype given as a string, a MindSpore/numpy/torch dtype or None to its name."""
    if value is None:
        return "float32"
    if isinstance(value, str):
        name = value
    else:
        import numpy as np

        try:  # numpy dtypes and scalar types
            name = np.dtype(value).name
        except TypeError:  # MindSpore (Float32) and torch (torch.float32) dtypes
            name = str(value)
    name = name.removeprefix("torch.").removeprefix("mindspore.")
    aliases = {
        "Float32": "float32",
        "Float16": "float16",
        "BFloat16": "bfloat16",
        "UInt8": "uint8",
        "Int8": "int8",
        "Float64": "float64",
        "float": "float32",
        "half": "float16",
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
    }
    return aliases.get(name, name)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite float >= 0 (0.0 disables outlier decomposition), got {value}")
    return value


def _check_compute_dtype(name: str, value: Any, accepted: tuple[str, ...] = CPU_COMPUTE_DTYPES) -> str:
    dtype = dtype_to_str(value)
    if dtype not in accepted:
        hint = (
            " (int8 activations are this library's opt-in: use Int4Config/Int8Config(compute_dtype='int8'))"
            if dtype == "int8" and "int8" not in accepted
            else ""
        )
        raise ConfigError(f"{name} must be one of {accepted}, got {value!r}{hint}")
    return dtype


def _check_group_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, a power of two in [32, 4096], got {value!r}")
    if value not in VALID_BLOCKSIZES:
        raise ConfigError(f"{name} must be a power of two in [32, 4096] (one of {VALID_BLOCKSIZES}), got {value}")
    return value


def _check_modules(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of module names (str) or None, got {value!r}")
    return list(value)


BNB_FIELDS = (
    "load_in_8bit",
    "load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)


def _unknown_arguments(owner: str, kwargs: dict[str, Any]) -> str:
    parts = []
    for key in sorted(kwargs):
        near = closest(key, BNB_FIELDS, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return f"{owner}: unknown argument(s) {', '.join(parts)}; accepted: {list(BNB_FIELDS)}"


class BitsAndBytesConfig:
    """transformers' ``BitsAndBytesConfig``: the same fields, defaults, meaning and JSON.

    Args:
        load_in_8bit: quantize Linear layers with LLM.int8() (``Linear8bitLt``).
        load_in_4bit: quantize Linear layers to 4 bits (``Linear4bit``, NF4 or FP4). Exclusive with 8-bit.
        llm_int8_threshold: outlier threshold of LLM.int8(): input columns with any ``|x| >=`` it are
            multiplied in floating point; 0.0 disables the decomposition.
        llm_int8_skip_modules: module names (or dotted-path suffixes) kept in full precision. Unlike
            transformers, this list is *added* to the default skip of the output head (``lm_head``)
            instead of replacing it; the head is converted only if a rule says so explicitly.
        llm_int8_enable_fp32_cpu_offload: transformers' GPU/CPU split; everything here runs on CPU
            already, so it only round-trips.
        llm_int8_has_fp16_weight: keep float weights next to the int8 ones (fine-tuning LLM.int8 layers).
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul: float32, float16 or bfloat16 (products of
            bf16-rounded operands summed in float32; input and output keep their dtype). Given as a string
            (also torch-style "torch.bfloat16") or a MindSpore/numpy/torch dtype.
        bnb_4bit_quant_type: "fp4" (transformers' default) or "nf4" (QLoRA).
        bnb_4bit_use_double_quant: quantize the absmax statistics again (about 0.37 bits per weight saved).
        bnb_4bit_quant_storage: dtype transformers packs 4-bit weights into; kept for the JSON, the
            packed bytes here are always uint8.
    """

    quant_method = "bitsandbytes"

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Any = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Any = None,
        **kwargs: Any,
    ) -> None:
        _check_bool("load_in_8bit", load_in_8bit)
        _check_bool("load_in_4bit", load_in_4bit)
        if load_in_4bit and load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = _check_threshold("llm_int8_threshold", llm_int8_threshold)
        self.llm_int8_skip_modules = _check_modules("llm_int8_skip_modules", llm_int8_skip_modules)
        _check_bool("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload)
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        _check_bool("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight)
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        if not isinstance(bnb_4bit_quant_type, str):
            raise TypeError(
                f"bnb_4bit_quant_type must be a string, one of {BNB_QUANT_TYPES}, got {bnb_4bit_quant_type!r}"
            )
        if bnb_4bit_quant_type not in BNB_QUANT_TYPES:
            hint = " (int4 is not a bitsandbytes format: use Int4Config)" if bnb_4bit_quant_type == "int4" else ""
            raise ConfigError(
                f"bnb_4bit_quant_type must be one of {BNB_QUANT_TYPES}, got {bnb_4bit_quant_type!r}{hint}"
            )
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        _check_bool("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = _check_compute_dtype("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype)
        storage = "uint8" if bnb_4bit_quant_storage is None else dtype_to_str(bnb_4bit_quant_storage)
        if storage not in QUANT_STORAGE_DTYPES:
            raise ConfigError(
                f"bnb_4bit_quant_storage must be one of {QUANT_STORAGE_DTYPES}, got {bnb_4bit_quant_storage!r}"
            )
        self.bnb_4bit_quant_storage = storage
        if kwargs:
            raise ConfigError(_unknown_arguments("BitsAndBytesConfig", kwargs))

    # transformers exposes these as properties guarding the 4/8-bit exclusivity
    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        _check_bool("load_in_4bit", value)
        if value and self._load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        self._load_in_4bit = value

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        _check_bool("load_in_8bit", value)
        if value and self._load_in_4bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        self._load_in_8bit = value

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """ "llm_int8", "fp4", "nf4", or None when neither 8- nor 4-bit loading is on."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    @property
    def skip_modules(self) -> list[str]:
        """Modules kept in full precision: the output head plus ``llm_int8_skip_modules``."""
        extra = [m for m in (self.llm_int8_skip_modules or []) if m not in DEFAULT_SKIP_MODULES]
        return list(DEFAULT_SKIP_MODULES) + extra

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, in the key order and spelling transformers writes into ``quantization_config``."""
        return {
            "quant_method": self.quant_method,
            "_load_in_8bit": self._load_in_8bit,
            "_load_in_4bit": self._load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.deepcopy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
            "bnb_4bit_quant_storage": self.bnb_4bit_quant_storage,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that differ from a default ``BitsAndBytesConfig()``."""
        default = BitsAndBytesConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default[k]}

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON exactly as transformers writes it (sorted keys, indent 2, trailing newline)."""
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str, use_diff: bool = True) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a ``quantization_config`` dict; ``kwargs`` override its entries (as in transformers)."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        data = dict(config_dict)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigError(f"quant_method must be {cls.quant_method!r} for a BitsAndBytesConfig, got {method!r}")
        for private, public in (("_load_in_8bit", "load_in_8bit"), ("_load_in_4bit", "load_in_4bit")):
            if private in data:
                data.setdefault(public, data[private])
                data.pop(private)
        typos = {k: v for k, v in kwargs.items() if k not in BNB_FIELDS}
        if typos:
            raise ConfigError(_unknown_arguments("BitsAndBytesConfig.from_dict", typos))
        data.update(kwargs)
        unused = {k: v for k, v in data.items() if k not in BNB_FIELDS}
        config = cls(**{k: v for k, v in data.items() if k in BNB_FIELDS})
        if unused and not return_unused_kwargs:
            # a checkpoint's config may carry keys of newer transformers versions: report, do not refuse
            logger.warning("BitsAndBytesConfig.from_dict: %s (ignored)", _unknown_arguments("keys", unused))
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_string(cls, text: str, **kwargs: Any) -> BitsAndBytesConfig:
        return cls.from_dict(json.loads(text), **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}\n"

    def to_quant_config(self) -> QuantConfig:
        """The seed-style config describing the same quantization."""
        if self.load_in_8bit:
            return Int8Config(
                threshold=self.llm_int8_threshold,
                has_fp16_weights=self.llm_int8_has_fp16_weight,
                llm_int8=True,
                modules_to_not_convert=self.llm_int8_skip_modules,
            )
        if self.load_in_4bit:
            return Int4Config(
                group_size=64,
                quant_type=self.bnb_4bit_quant_type,
                compress_statistics=self.bnb_4bit_use_double_quant,
                compute_dtype=self.bnb_4bit_compute_dtype,
                modules_to_not_convert=self.llm_int8_skip_modules,
            )
        raise ConfigError("this BitsAndBytesConfig quantizes nothing (load_in_8bit and load_in_4bit are both False)")


@dataclass
class QuantConfig:
    """The seed's generic quantization config.

    Args:
        bits: 8 or 4.
        symmetric: symmetric (absmax) or asymmetric (min/max with an offset) scaling. Asymmetric is
            available for weight-only INT8 and for INT4.
        per_channel: INT8 only: one scale per output channel (True) or per tensor.
        group_size: 4-bit only: elements per scale (bitsandbytes calls it blocksize), a power of two in
            [32, 4096].
        quant_type: "int8" for 8 bits; "nf4", "fp4" or "int4" for 4 bits (default: "int8" / "int4").
        compress_statistics: 4-bit only: double-quantize the scales.
        threshold: 8-bit only: LLM.int8() outlier threshold.
        has_fp16_weights: 8-bit only: keep float weights for training (the seed's training mode).
        llm_int8: 8-bit only: quantize activations too (LLM.int8(), ``Linear8bitLt``) instead of the
            weight-only ``Linear8bit``. Defaults to ``threshold > 0``.
        compute_dtype: how the quantized matmul computes: "float32", "float16", "bfloat16" or "int8"
            (activations quantized to int8 on the fly, W4A8 / W8A8; weight-only layers only, symmetric).
        modules_to_not_convert: module names kept in full precision (added to the default ``lm_head``).
        quantize_embeddings: also quantize the lookup tables (token embeddings) in the same format
            (``Embedding4bit`` at ``group_size`` / ``Embedding8bit``); off by default, as in transformers. A
            table tied to the output head is kept (the pass explains why).
        quantize_lm_head: also quantize the output head ``lm_head`` (skipped by default).
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    group_size: int = 128
    quant_type: str | None = None
    compress_statistics: bool = False
    threshold: float = 0.0
    has_fp16_weights: bool = False
    llm_int8: bool | None = None
    compute_dtype: Any = "float32"
    modules_to_not_convert: list[str] | None = field(default=None)
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ConfigError(f"bits must be 8 or 4, got {self.bits!r}")
        for name in (
            "symmetric",
            "per_channel",
            "compress_statistics",
            "has_fp16_weights",
            "quantize_embeddings",
            "quantize_lm_head",
        ):
            _check_bool(name, getattr(self, name))
        self.group_size = _check_group_size("group_size", self.group_size)
        self.threshold = _check_threshold("threshold", self.threshold)
        self.compute_dtype = _check_compute_dtype("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        self.modules_to_not_convert = _check_modules("modules_to_not_convert", self.modules_to_not_convert)
        if self.quantize_lm_head and any(m in DEFAULT_SKIP_MODULES for m in self.modules_to_not_convert or []):
            raise ConfigError(
                f"quantize_lm_head=True contradicts modules_to_not_convert={self.modules_to_not_convert}, "
                f"which lists {list(DEFAULT_SKIP_MODULES)}"
            )
        if self.bits == 8:
            if self.quant_type is None:
                self.quant_type = "int8"
            if self.quant_type != "int8":
                raise ConfigError(f"quant_type for bits=8 must be 'int8', got {self.quant_type!r}")
            if self.llm_int8 is None:
                self.llm_int8 = self.threshold > 0
            _check_bool("llm_int8", self.llm_int8)
            if self.llm_int8 and self.compute_dtype != "float32":
                raise ConfigError(
                    "LLM.int8() (llm_int8=True or threshold > 0) fixes its own compute (int8 x int8, float "
                    f"outliers); compute_dtype must be 'float32', got {self.compute_dtype!r}"
                )
            if self.compute_dtype == "int8" and not self.symmetric:
                raise ConfigError(
                    "compute_dtype='int8' needs symmetric=True (asymmetric int8 weights are not supported)"
                )
            if self.llm_int8 and not (self.symmetric and self.per_channel):
                raise ConfigError(
                    "LLM.int8() (llm_int8=True or threshold > 0) is symmetric and per-channel; got "
                    f"symmetric={self.symmetric}, per_channel={self.per_channel}"
                )
        else:
            if self.quant_type is None:
                self.quant_type = "int4"
            if self.quant_type not in QUANT_TYPES_4BIT:
                raise ConfigError(f"quant_type for bits=4 must be one of {QUANT_TYPES_4BIT}, got {self.quant_type!r}")
            if not self.symmetric and self.quant_type != "int4":
                raise ConfigError(f"symmetric=False is only defined for quant_type='int4', got {self.quant_type!r}")
            if self.compute_dtype == "int8" and not self.symmetric:
                raise ConfigError("compute_dtype='int8' needs symmetric=True (asymmetric int4 is not supported)")
            if self.llm_int8:
                raise ConfigError("llm_int8=True needs bits=8")
            self.llm_int8 = False

    @property
    def skip_modules(self) -> list[str]:
        extra = [m for m in (self.modules_to_not_convert or []) if m not in DEFAULT_SKIP_MODULES]
        return ([] if self.quantize_lm_head else list(DEFAULT_SKIP_MODULES)) + extra

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - names)
        if unknown:
            hints = "".join(
                f"; {k!r}: did you mean {closest(k, names, 1)[0]!r}?" for k in unknown if closest(k, names, 1)
            )
            raise ConfigError(f"{cls.__name__}.from_dict: unknown field(s) {unknown}{hints}; accepted: {sorted(names)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_bnb_config(self) -> BitsAndBytesConfig:
        """The equivalent transformers config; ValueError for what bitsandbytes cannot express."""
        skip = self.modules_to_not_convert
        for name in ("quantize_embeddings", "quantize_lm_head"):
            if getattr(self, name):
                raise ConfigError(
                    f"{name}=True has no BitsAndBytesConfig equivalent (transformers keeps embeddings and the "
                    "head in full precision); use this QuantConfig, or rules, with the pass"
                )
        if self.bits == 8:
            if not self.llm_int8:
                raise ConfigError(
                    "weight-only INT8 (llm_int8=False) has no BitsAndBytesConfig equivalent: bitsandbytes' 8-bit "
                    "layer is LLM.int8(), which also quantizes activations; set llm_int8=True"
                )
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=self.threshold,
                llm_int8_has_fp16_weight=self.has_fp16_weights,
                llm_int8_skip_modules=skip,
            )
        if self.quant_type not in BNB_QUANT_TYPES:
            raise ConfigError(f"quant_type={self.quant_type!r} has no BitsAndBytesConfig equivalent (nf4 or fp4 only)")
        if self.group_size != 64:
            raise ConfigError(
                f"BitsAndBytesConfig always uses blocksize 64; this config has group_size={self.group_size}"
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.compress_statistics,
            bnb_4bit_compute_dtype=self.compute_dtype,
            llm_int8_skip_modules=skip,
        )

    @staticmethod
    def from_bnb_config(config: BitsAndBytesConfig) -> QuantConfig:
        return config.to_quant_config()


@dataclass
class Int8Config(QuantConfig):
    """The seed's INT8 config: weight-only INT8 (``Linear8bit``), or LLM.int8() when ``threshold > 0``
    or ``llm_int8=True`` (``Linear8bitLt``)."""

    bits: int = 8

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ConfigError(f"Int8Config has bits=8, got {self.bits!r}")
        super().__post_init__()


@dataclass
class Int4Config(QuantConfig):
    """The seed's 4-bit config: ``Linear4bit`` with ``quant_type`` int4 (default), nf4 or fp4."""

    bits: int = 4
    compress_statistics: bool = True

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ConfigError(f"Int4Config has bits=4, got {self.bits!r}")
        super().__post_init__()
