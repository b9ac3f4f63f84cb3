"""Memory accounting: parameter bytes of a network, resident memory (RSS) of this process, and training-memory
estimates for full / LoRA / QLoRA fine-tuning (the seed's ``QLoRAStats`` API with the real formats)."""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class RSSMonitor:
    """Samples RSS in a background thread: ``with RSSMonitor() as m: ...; m.peak``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RSSMonitor:
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, current_rss())


def parameter_bytes(net: Any) -> dict[str, Any]:
    """Parameters of a network: count, bytes, and bytes per dtype (tied parameters counted once)."""
    total = count = 0
    by_dtype: dict[str, int] = {}
    for _, p in net.parameters_and_names():
        nbytes = int(p.size * p.itemsize)
        total += nbytes
        count += int(p.size)
        key = str(p.dtype)
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    return {"num_params": count, "bytes": total, "by_dtype": by_dtype}


def release_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; after a garbage collection unless
    ``collect=False``), so that RSS reflects what is really held: after a pass, and between its layers,
    where the temporaries of quantizing one layer would otherwise stay resident."""
    import gc

    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim (returns freed heap pages to the system), or None elsewhere; looked up once."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# ---- training-memory estimates (the seed's QLoRA API, done with the real formats and shapes) ---------------------
GB = 1024**3

# bits per weight of the 4-bit formats at blocksize 64: 4 bits of code, one absmax per block (float32, or an
# 8-bit code with one float32 nested absmax per 256 blocks when double-quantized)
NF4_BITS = 4 + 32 / 64  # 4.5
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127


def _pos_int(name: str, value: Any) -> int:
    from .errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"QLoRAStats: {name} must be a positive integer, got {value!r}")
    return value


class QLoRAStats:
    """A decoder-only transformer's shapes for memory estimates (the seed's ``QLoRAStats``).

    ``QLoRAStats(hidden_size=4096, num_layers=32, seq_length=1024, vocab_size=32000)`` (the seed's
    defaults; LLaMA-7B-like). Optional, with LLaMA's defaults: ``intermediate_size`` (default
    ``int(8/3 * hidden)`` rounded up to a multiple of 256, SwiGLU: 3 matrices), ``num_attention_heads``
    (``hidden // 128``), ``num_key_value_heads`` (= heads), ``batch_size`` (1), ``tie_word_embeddings``
    (False), the LoRA ``lora_r`` (8) and ``lora_targets`` (the 7 projections of a block: ``"all"``, or a
    list among q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), ``dtype_bytes`` (2: bf16/fp16
    activations and unquantized weights; 4 for float32 as on this CPU).
    """

    LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(
        self,
        hidden_size: int = 4096,
        num_layers: int = 32,
        seq_length: int = 1024,
        vocab_size: int = 32000,
        *,
        intermediate_size: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        batch_size: int = 1,
        tie_word_embeddings: bool = False,
        lora_r: int = 8,
        lora_targets: Any = "all",
        dtype_bytes: int = 2,
    ):
        from .errors import ConfigError

        self.hidden_size = _pos_int("hidden_size", hidden_size)
        self.num_layers = _pos_int("num_layers", num_layers)
        self.seq_length = _pos_int("seq_length", seq_length)
        self.vocab_size = _pos_int("vocab_size", vocab_size)
        h = self.hidden_size
        self.intermediate_size = _pos_int(
            "intermediate_size", intermediate_size if intermediate_size is not None else -(-(8 * h // 3) // 256) * 256
        )
        self.num_attention_heads = _pos_int("num_attention_heads", num_attention_heads or max(1, h // 128))
        self.num_key_value_heads = _pos_int("num_key_value_heads", num_key_value_heads or self.num_attention_heads)
        if h % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"QLoRAStats: hidden_size {h} must divide by num_attention_heads {self.num_attention_heads}, "
                f"which must divide by num_key_value_heads {self.num_key_value_heads}"
            )
        self.batch_size = _pos_int("batch_size", batch_size)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.lora_r = _pos_int("lora_r", lora_r)
        targets = list(self.LINEARS) if lora_targets == "all" else list(lora_targets)
        bad = [t for t in targets if t not in self.LINEARS]
        if bad:
            raise ConfigError(
                f"QLoRAStats: lora_targets {bad} unknown; accepted: 'all' or names in {list(self.LINEARS)}"
            )
        self.lora_targets = targets
        if dtype_bytes not in (2, 4):
            raise ConfigError(f"QLoRAStats: dtype_bytes must be 2 or 4, got {dtype_bytes!r}")
        self.dtype_bytes = dtype_bytes

    @classmethod
    def from_config(cls, config: Any, seq_length: int, **kwargs: Any) -> QLoRAStats:
        """From a ``LlamaConfig`` (or anything with transformers' field names)."""
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            seq_length,
            config.vocab_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            **kwargs,
        )

    # ---- shapes ------------------------------------------------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one block."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_parameter_count(self) -> int:
        """Weights of the quantizable projections (all layers)."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_parameter_count(self) -> int:
        """Embeddings, the output head (unless tied) and the norms: kept in ``dtype_bytes`` by QLoRA."""
        h, v = self.hidden_size, self.vocab_size
        return v * h * (1 if self.tie_word_embeddings else 2) + (2 * self.num_layers + 1) * h

    def parameter_count(self) -> int:
        """Every parameter (the seed's ``12 * H^2 * L`` counts only an approximation of the projections)."""
        return self.linear_parameter_count() + self.other_parameter_count()

    def lora_parameter_count(self) -> int:
        shapes = self.linear_shapes()
        return self.num_layers * sum(self.lora_r * (shapes[t][0] + shapes[t][1]) for t in self.lora_targets)

    def activation_bytes(self, recompute: bool = False) -> int:
        """Activations kept for the backward pass, from the tensors a LLaMA block saves (``dtype_bytes``
        each; softmax probabilities [B, heads, T, T]; logits and their softmax in float32).

        Per block: the block input and the normed input (2 BTH), q, k, v before and after RoPE
        (2 BT(H + 2 kv)), attention probabilities (B heads T^2), the attention output (BTH), the residual
        and the normed MLP input (2 BTH), gate, up, silu(gate) and their product (4 BTI). With
        ``recompute`` (``Cell.recompute()`` on every block) only the block inputs stay, plus one block's
        activations while it is recomputed."""
        b, t, h, i = self.batch_size, self.seq_length, self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        per_block = (
            2 * b * t * h
            + 2 * b * t * (h + 2 * kv)
            + b * self.num_attention_heads * t * t
            + 3 * b * t * h
            + 4 * b * t * i
        ) * self.dtype_bytes
        logits = 2 * b * t * self.vocab_size * 4
        if recompute:
            return self.num_layers * b * t * h * self.dtype_bytes + per_block + logits
        return self.num_layers * per_block + logits

    def breakdown(self, method: str = "qlora", optimizer: str = "adamw", recompute: bool = False) -> dict[str, int]:
        """Bytes by kind for ``method`` "full" (all weights trained; mixed precision when dtype_bytes == 2:
        16-bit weights and gradients plus a float32 master copy), "lora" (frozen 16-bit base), "qlora" (frozen
        NF4+DQ base, 4.127 bits per projection weight); ``optimizer`` "adamw" (two float32 states) or
        "adamw8bit" (two uint8 states + a float32 absmax per 2048)."""
        from .errors import ConfigError

        if method not in ("full", "lora", "qlora"):
            raise ConfigError(f"method = {method!r} is not accepted; accepted: ['full', 'lora', 'qlora']")
        if optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optimizer = {optimizer!r} is not accepted; accepted: ['adamw', 'adamw8bit']")
        e = self.dtype_bytes
        lin, other = self.linear_parameter_count(), self.other_parameter_count()
        if method == "full":
            trained = lin + other
            weights = trained * e + (trained * 4 if e == 2 else 0)  # + fp32 master weights
            grads = trained * e
        else:
            trained = self.lora_parameter_count()
            base = math.ceil(lin * NF4_DQ_BITS / 8) if method == "qlora" else lin * e
            weights = base + other * e + trained * 4
            grads = trained * 4
        state = trained * 8 if optimizer == "adamw" else trained * 2 + math.ceil(trained / 2048) * 8
        return {
            "weights": int(weights),
            "gradients": int(grads),
            "optimizer_states": int(state),
            "activations": int(self.activation_bytes(recompute)),
            "trainable_params": int(trained),
        }

    def total_bytes(self, method: str = "qlora", optimizer: str = "adamw", recompute: bool = False) -> int:
        d = self.breakdown(method, optimizer, recompute)
        return d["weights"] + d["gradients"] + d["optimizer_states"] + d["activations"]

    def __repr__(self) -> str:
        return (
            f"QLoRAStats(hidden_size={self.hidden_size}, num_layers={self.num_layers}, seq_length={self.seq_length}, "
            f"vocab_size={self.vocab_size}, intermediate_size={self.intermediate_size}, "
            f"num_attention_heads={self.num_attention_heads}, num_key_value_heads={self.num_key_value_heads}, "
            f"batch_size={self.batch_size})"
        )


def estimate_paged_memory(stats: QLoRAStats) -> dict[str, float]:
    """The seed's comparison, with the real accounting: ``fp16_gb`` = full mixed-precision fine-tuning
    (16-bit weights and gradients, float32 master weights and AdamW states, activations), ``qlora_gb`` =
    NF4+DQ base + 16-bit embeddings/norms + float32 LoRA adapters, their gradients and AdamW8bit states +
    activations; both with gradient checkpointing off. Also ``qlora_adamw_gb`` (fp32 AdamW states) and
    ``qlora_recompute_gb``. (Paged optimizers only move GPU state to host memory under pressure; on a CPU
    machine there is nothing to page, so they change nothing here.) Logs the numbers."""
    if not isinstance(stats, QLoRAStats):
        raise TypeError(f"stats must be a QLoRAStats, got {type(stats).__name__}")
    out = {
        "fp16_gb": stats.total_bytes("full", "adamw") / GB,
        "qlora_gb": stats.total_bytes("qlora", "adamw8bit") / GB,
        "qlora_adamw_gb": stats.total_bytes("qlora", "adamw") / GB,
        "qlora_recompute_gb": stats.total_bytes("qlora", "adamw8bit", recompute=True) / GB,
    }
    logger.info("[paged optimizer] FP16=%.2fGB, QLoRA=%.2fGB", out["fp16_gb"], out["qlora_gb"])
    return out


def gradient_checkpointing_saving(stats: QLoRAStats) -> float:
    """GB of activations that recomputing every block saves (from the real per-block tensors)."""
    if not isinstance(stats, QLoRAStats):
        raise TypeError(f"stats must be a QLoRAStats, got {type(stats).__name__}")
    saved = (stats.activation_bytes(False) - stats.activation_bytes(True)) / GB
    logger.info("[checkpoint] activations saved: %.2f GB", saved)
    return saved


def nf4_quantize(tensor: Any, blocksize: int = 64) -> np.ndarray:
    """The seed's teaching helper, done for real: the bitsandbytes NF4 round trip (blocks of ``blocksize``,
    float32 absmax) of ``tensor``; returns the dequantized float32 array of the same shape."""
    from .formats import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(np.asarray(tensor, dtype=np.float32), blocksize, "nf4")
    return dequantize_4bit(packed, state)


# MindSpore 2.10's graph runtime on CPU, for one jit train step (value_and_grad + optimizer), in bytes: what a
# step holds beyond the weights, gradients, optimizer states and saved activations. Measured with
# tools/bench_qlora.py on LLaMA-shaped decoders (hidden 64..1536, 1..8 layers; full fine-tuning, LoRA, QLoRA,
# QLoRA + AdamW8bit) and fitted by non-negative least squares; see README "QLoRA" for the data. The terms:
# the runtime itself and a minimal graph (fixed); the compiled IR and kernels of a decoder layer; per byte of
# saved activations, the memory pool's temporaries and the index arrays CPU kernels keep (transposes); per
# LoRA adapter, its graph nodes and, per byte of its [tokens, in + out] input and output, its temporaries;
# per 4-/8-bit layer, its custom kernel and bprop nodes; per element AdamW8bit updates, what its unrolled
# block-wise update holds (about 1.7 KB per element, measured, cause not found; AdamWeightDecay is one fused
# kernel per parameter: no term). Fit: within 6% of the measured peak for full / LoRA / QLoRA on all 24
# runs (one configuration held out: within 7%); AdamW8bit within 12% except one run (-24%).
RUNTIME_OVERHEAD = {
    "fixed": 91_100_000,
    "per_layer": 14_920_000,
    "per_activation_byte": 0.802,
    "per_adapter": 2_501_000,
    "per_adapter_io_byte": 1.655,
    "per_quantized_layer": 1_365_000,
    "per_8bit_element": 1746,
}


def runtime_features(net: Any, seq_length: int, batch_size: int = 1, optimizer: str = "adamw") -> dict[str, int]:
    """The quantities :data:`RUNTIME_OVERHEAD` multiplies, read from an actual network: decoder layers (from
    a LLaMA-like ``config``), saved activation bytes, LoRA adapters and the bytes of their float32 inputs and
    outputs for ``batch_size * seq_length`` tokens, quantized linear layers, and the trainable elements an
    ``AdamW8bit`` step updates."""
    from .lora import LoraLayer
    from .nn._base import QuantLinear

    tokens = int(seq_length) * int(batch_size)
    adapters = io = quantized = 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, LoraLayer):
            adapters += 1
            io += tokens * (cell.in_features + cell.out_features) * 4
        elif isinstance(cell, QuantLinear):
            quantized += 1
    config = getattr(net, "config", None)
    layers = acts = 0
    if config is not None and hasattr(config, "num_hidden_layers"):
        layers = int(config.num_hidden_layers)
        acts = QLoRAStats.from_config(config, seq_length, batch_size=batch_size, dtype_bytes=4).activation_bytes()
    trainable = sum(int(p.size) for p in net.trainable_params())
    return {
        "layers": layers,
        "activation_bytes": int(acts),
        "adapters": adapters,
        "adapter_io_bytes": io,
        "quantized_layers": quantized,
        "8bit_elements": trainable if optimizer == "adamw8bit" else 0,
    }


def runtime_overhead(features: dict[str, int]) -> int:
    """Bytes of MindSpore's graph runtime for a train step with these :func:`runtime_features`."""
    c = RUNTIME_OVERHEAD
    return int(
        c["fixed"]
        + c["per_layer"] * features["layers"]
        + c["per_activation_byte"] * features["activation_bytes"]
        + c["per_adapter"] * features["adapters"]
        + c["per_adapter_io_byte"] * features["adapter_io_bytes"]
        + c["per_quantized_layer"] * features["quantized_layers"]
        + c["per_8bit_element"] * features["8bit_elements"]
    )


def estimate_network(
    net: Any,
    seq_length: int,
    batch_size: int = 1,
    optimizer: str = "adamw",
    recompute: bool = False,
    runtime: bool = True,
) -> dict[str, int]:
    """Training memory of an actual network: its parameters' real bytes (quantized or not), gradients
    (float32 per trainable element), optimizer states ("adamw" 8 bytes per trainable element, "adamw8bit"
    as ``msbnb_pass.AdamW8bit`` stores them), activations from its shapes when the network has a
    LLaMA-like ``config``, and (``runtime=True``) what MindSpore's graph runtime holds for a jit train
    step on CPU (:data:`RUNTIME_OVERHEAD`, measured; see :func:`measure_training` for the measured
    mode). ``total`` is the sum."""
    from .errors import ConfigError

    if optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"optimizer = {optimizer!r} is not accepted; accepted: ['adamw', 'adamw8bit']")
    weights = trained = 0
    seen: set[int] = set()
    for _, p in net.parameters_and_names():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += int(p.size * p.itemsize)
        if p.requires_grad:
            trained += int(p.size)
    state = trained * 8 if optimizer == "adamw" else trained * 2 + math.ceil(trained / 2048) * 8
    acts = 0
    config = getattr(net, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        stats = QLoRAStats.from_config(config, seq_length, batch_size=batch_size, dtype_bytes=4)
        acts = stats.activation_bytes(recompute)
    overhead = runtime_overhead(runtime_features(net, seq_length, batch_size, optimizer)) if runtime else 0
    return {
        "weights": weights,
        "gradients": trained * 4,
        "optimizer_states": int(state),
        "activations": int(acts),
        "runtime": overhead,
        "trainable_params": trained,
        "total": int(weights + trained * 4 + state + acts + overhead),
    }


def measure_training(
    step: Callable[[], Any],
    steps: int = 3,
    *,
    net: Any = None,
    seq_length: int | None = None,
    batch_size: int = 1,
    optimizer: str = "adamw",
    recompute: bool = False,
    baseline_rss: int | None = None,
) -> dict[str, Any]:
    """The estimator's measured mode: run ``step()`` (one train step, e.g. ``lambda: train_step(x, y)``;
    the first call compiles) ``steps`` times, sample the RSS, and report the peak next to
    :func:`estimate_network`'s numbers for ``net`` (when ``net`` and ``seq_length`` are given).

    ``measured_peak`` is the peak RSS while training above ``baseline_rss`` (the RSS of the process
    before the model was built, after importing MindSpore) when it is given; otherwise the RSS increase
    during the steps plus the bytes of ``net``'s parameters (resident before the first step). Each step's
    result is synchronised (``asnumpy``) so that its memory is in the sample. Returns ``measured_peak``,
    ``estimate`` (the breakdown or None), ``estimate_total``, ``ratio`` (measured / estimate),
    ``first_step_s`` (compile + run) and ``step_s`` (mean of the others)."""
    from .errors import ConfigError

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"measure_training: steps must be a positive integer, got {steps!r}")
    if not callable(step):
        raise ConfigError(f"measure_training: step must be a callable running one train step, got {step!r}")
    if baseline_rss is None and net is None:
        raise ConfigError("measure_training: give net (its parameters are counted as resident) or baseline_rss")
    est = None
    if net is not None and seq_length is not None:
        est = estimate_network(net, seq_length, batch_size, optimizer, recompute)
    release_memory()
    before = current_rss()
    times = []
    with RSSMonitor() as mon:
        for _ in range(steps):
            t0 = time.perf_counter()
            out = step()
            for leaf in out if isinstance(out, (tuple, list)) else (out,):
                if hasattr(leaf, "asnumpy"):
                    leaf.asnumpy()
            times.append(time.perf_counter() - t0)
    if baseline_rss is not None:
        measured = mon.peak - int(baseline_rss)
    else:
        measured = mon.peak - before + parameter_bytes(net)["bytes"]
    total = est["total"] if est is not None else None
    out = {
        "measured_peak": int(measured),
        "estimate": est,
        "estimate_total": total,
        "ratio": measured / total if total else None,
        "first_step_s": times[0],
        "step_s": sum(times[1:]) / (len(times) - 1) if len(times) > 1 else None,
        "steps": steps,
    }
    logger.info(
        "[measure] peak RSS %.1f MB, estimate %s MB",
        measured / 2**20,
        f"{total / 2**20:.1f}" if total else "-",
    )
    return out
