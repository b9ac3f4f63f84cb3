"""``msbnb inspect`` and ``msbnb convert``: checkpoints on disk, without building a network.

Registered on the ``msbnb`` parser by :func:`add_model_commands`. Argument parsing and printing only; the
work is ``msbnb_pass.io`` (readers/writers) and the numpy formats / kernel quantizers.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from .errors import CLIError

logger = logging.getLogger(__name__)

CONVERT_FORMATS = ("none", "nf4", "fp4", "int8")

# float weights that are linear layers (what transformers + bitsandbytes would quantize), per model type
_LINEAR_KEYS = {
    "llama": re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"),
    "bert": re.compile(
        r"^(encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|"
        r"intermediate\.dense|output\.dense)|pooler\.dense)\.weight$"
    ),
}


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="a checkpoint's tensors, formats, bytes and config (transformers dir, .safetensors or .gguf)",
    )
    p.add_argument("path", help="a transformers save_pretrained directory, a .safetensors file or a .gguf file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every tensor (default: layers summarised)")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser(
        "convert",
        help="GGUF / transformers dir -> transformers + bitsandbytes dir, optionally quantizing float linears",
    )
    p.add_argument("src", help="a transformers directory (float or bitsandbytes) or a LLaMA .gguf file")
    p.add_argument("dst", help="the output directory (config.json + model.safetensors)")
    p.add_argument(
        "--quantize",
        choices=CONVERT_FORMATS,
        default="none",
        help="quantize float linear weights: nf4/fp4 (bitsandbytes 4-bit) or int8 (LLM.int8); stored "
        "quantized tensors are copied as they are, never re-quantized",
    )
    p.add_argument("--double-quant", action="store_true", help="4-bit: double-quantize the absmax")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    p.add_argument("--max-shard-size", type=int, default=None, help="bytes per shard (default: one file)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.add_argument(
        "--calibration",
        metavar="TEXT",
        help="choose the codes by GPTQ on this UTF-8 text file ('pydoc': Python's own pydoc topics) instead of "
        "round-to-nearest: builds the network, runs it on the text, writes the same formats",
    )
    p.add_argument("--calibration-samples", type=int, default=8, help="windows of calibration text (default 8)")
    p.add_argument("--calibration-len", type=int, default=256, help="tokens per window (default 256)")
    p.set_defaults(func=_cmd_convert)


def _open(path: Path) -> tuple[dict[str, Any], Any, str, list, Any]:
    """(config, store, "gguf" | "transformers", the safetensors files read, the GGUF's tokenizer or None)."""
    from .io import open_gguf, open_safetensors, read_config

    magic = b""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
    if magic == b"GGUF":
        contents = open_gguf(path)
        return contents.config, contents.store, "gguf", [], contents.tokenizer
    config = read_config(path if path.is_dir() else path.parent)
    store, files = open_safetensors(path)
    return config, store, "transformers", files, None


def _layer_formats(store) -> dict[str, str]:
    """module prefix -> format of its stored weight (nf4, fp4, int4, llm_int8)."""
    out = {}
    for key in store:
        if ".weight.quant_state." in key:
            out[key.split(".weight.quant_state.")[0]] = key.rsplit("__", 1)[-1]
        elif key.endswith(".SCB"):
            out[key[: -len(".SCB")]] = "llm_int8"
    return out


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """What ``msbnb inspect`` prints: the config, the quantization_config and every tensor's dtype, shape,
    bytes and the format of the layer it belongs to."""
    path = Path(path)
    config, store, fmt, files, _ = _open(path)
    layers = _layer_formats(store)
    tensors = []
    for key in store:
        module = next((m for m in (key.split(".weight")[0], key.rsplit(".", 1)[0]) if m in layers), None)
        tensors.append({"name": key, "dtype": store.dtype(key), "format": layers.get(module, "float"), "bytes": 0})
    if fmt == "transformers":
        sizes = {k: (f.shape(k), f.nbytes(k)) for f in files for k in f.keys()}
        for t in tensors:
            shape, nbytes = sizes.get(t["name"], (None, 0))
            t["shape"], t["bytes"] = list(shape) if shape is not None else None, nbytes
    else:
        for t in tensors:
            arr = store[t["name"]]
            t["shape"], t["bytes"] = list(arr.shape), int(arr.nbytes)
    by_format: dict[str, int] = {}
    for t in tensors:
        by_format[t["format"]] = by_format.get(t["format"], 0) + t["bytes"]
    return {
        "path": str(path),
        "source_format": fmt,
        "model_type": config.get("model_type"),
        "config": {k: v for k, v in config.items() if k != "quantization_config"},
        "quantization_config": config.get("quantization_config"),
        "layers": {f: sum(1 for v in layers.values() if v == f) for f in sorted(set(layers.values()))},
        "bytes_by_format": by_format,
        "total_bytes": sum(t["bytes"] for t in tensors),
        "tensors": tensors,
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mib = 2**20
    print(f"{report['path']}  ({report['source_format']}, model_type={report['model_type']})")
    cfg = report["config"]
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    print("  " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))
    qc = report["quantization_config"]
    print(f"  quantization_config: {json.dumps(qc, sort_keys=True) if qc else 'none (float checkpoint)'}")
    print("  quantized layers: " + (", ".join(f"{n} {f}" for f, n in report["layers"].items()) or "none"))
    for f, b in sorted(report["bytes_by_format"].items()):
        print(f"  {f:>9}: {b / mib:10.2f} MiB")
    print(f"  {'total':>9}: {report['total_bytes'] / mib:10.2f} MiB in {len(report['tensors'])} tensors")
    rows = report["tensors"]
    if not args.all:
        rows = [t for t in rows if not re.search(r"\.layers?\.([1-9]\d*)\.", t["name"])]
        print("  tensors (first layer and globals; --all lists every one):")
    width = max((len(t["name"]) for t in rows), default=10)
    for t in rows:
        print(f"    {t['name']:<{width}}  {t['dtype']:>5}  {t['format']:>8}  {str(t['shape']):>16}  {t['bytes']:>12,}")
    return 0


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    quantize: str = "none",
    double_quant: bool = False,
    blocksize: int = 64,
    max_shard_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Read ``src`` (GGUF or transformers directory), quantize its float linear weights with ``quantize``
    (bit-exact with bitsandbytes for nf4/fp4/int8), copy stored quantized tensors unchanged, and write a
    transformers + bitsandbytes directory at ``dst``. Returns a summary."""
    import numpy as np

    from .config import BitsAndBytesConfig
    from .io import CheckpointError, float32_to_bf16, write_checkpoint
    from .kernels import quantize as fast

    if quantize not in CONVERT_FORMATS:
        raise ValueError(f"quantize must be one of {CONVERT_FORMATS}, got {quantize!r}")
    src, dst = Path(src), Path(dst)
    config, store, fmt, _, tokenizer = _open(src)
    existing = _layer_formats(store)
    if quantize != "none" and existing:
        raise CheckpointError(
            f"{src} already holds quantized layers ({len(existing)}, e.g. '{next(iter(existing))}': "
            f"{next(iter(existing.values()))}); re-quantizing would compound errors: convert with --quantize none"
        )
    pattern = _LINEAR_KEYS.get(config.get("model_type"))
    if quantize != "none" and pattern is None:
        raise CheckpointError(
            f"{src}: model_type {config.get('model_type')!r} is not supported (accepted: {sorted(_LINEAR_KEYS)})"
        )
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    quantized = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(store), desc=f"converting {src.name}", unit="tensor", file=sys.stderr)
    for key in store:
        value = store[key]
        stored = store.dtype(key)
        if quantize != "none" and pattern.match(key) and value.ndim == 2:
            module = key[: -len(".weight")]
            if quantize == "int8":
                cb, scb = fast.int8_vectorwise_quant(value)
                tensors.update({key: cb, f"{module}.SCB": scb, f"{module}.weight_format": np.array(0, np.uint8)})
            else:
                packed, state = fast.quantize_4bit(value, blocksize, quantize, double_quant)
                state.dtype = {"F16": "float16", "BF16": "bfloat16"}.get(stored, "float32")
                tensors[key] = packed
                tensors.update(state.to_state_dict(key))
            quantized += 1
        else:
            if stored == "F16":
                value = value.astype(np.float16)  # exact; half the memory until written
            elif stored == "BF16":
                value = float32_to_bf16(value)  # exact: the bf16 words as stored
            tensors[key] = value
            if stored in ("F16", "BF16", "F32", "F64"):
                dtypes[key] = stored
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out_config = dict(config)
    if quantize != "none":
        bnb = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantize == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=double_quant
            )
        )
        out_config["quantization_config"] = bnb.to_dict()
    elif existing and set(existing.values()) & {"int4"}:
        out_config["quantization_config"] = {
            "quant_method": "msbnb",
            "formats": sorted(set(existing.values())),
            "note": "GGUF 4-bit blocks as msbnb int4 (no re-quantization); transformers + bitsandbytes cannot load them",
        }
    written = write_checkpoint(dst, out_config, tensors, dtypes, max_shard_size)
    written += _copy_tokenizer(src, dst, fmt, tokenizer)
    return {
        "source": str(src),
        "source_format": fmt,
        "destination": str(dst),
        "quantized_layers": quantized,
        "files": [str(p) for p in written],
    }


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt")


def _copy_tokenizer(src: Path, dst: Path, fmt: str, gguf_tokenizer: Any) -> list[Path]:
    """The tokenizer goes with the weights: a GGUF's (built from its metadata) becomes ``tokenizer.json``; a
    transformers directory's tokenizer files are copied."""
    from .io import atomic_write

    if fmt == "gguf":
        if gguf_tokenizer is None:
            logger.warning("%s: no tokenizer in the metadata; none written", src)
            return []
        atomic_write(dst / "tokenizer.json", [gguf_tokenizer.to_str().encode("utf-8")])
        return [dst / "tokenizer.json"]
    directory = src if src.is_dir() else src.parent
    out = []
    for name in _TOKENIZER_FILES:
        if (directory / name).is_file():
            atomic_write(dst / name, [(directory / name).read_bytes()])
            out.append(dst / name)
    return out


def calibration_text(spec: str) -> str:
    """The text of ``--calibration``: a UTF-8 file, or ``pydoc`` (Python's ``pydoc_data.topics``)."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    try:
        return Path(spec).read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(
            f"--calibration {spec}: cannot read it ({exc.strerror or exc}); give a text file or 'pydoc'"
        ) from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"--calibration {spec}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def calibrated_convert(
    src: str | Path,
    dst: str | Path,
    quantize: str,
    text: str,
    samples: int = 8,
    length: int = 256,
    double_quant: bool = False,
    blocksize: int = 64,
    max_shard_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``convert`` with GPTQ-chosen codes: load the float checkpoint as a network, calibrate on ``samples``
    windows of ``length`` tokens of ``text`` (tokenized by the checkpoint's own tokenizer), quantize every
    linear but the output head in the same formats ``convert`` writes, and save it with its tokenizer."""
    import time

    import mindspore as ms
    import numpy as np

    from .passes import apply
    from .pretrained import from_pretrained, save_pretrained, tokenizer_from_pretrained
    from .rules import RuleSet

    if quantize not in ("nf4", "fp4", "int8"):
        raise CLIError(f"--calibration needs --quantize nf4, fp4 or int8 (the codes it chooses), got {quantize!r}")
    for name, value in (("--calibration-samples", samples), ("--calibration-len", length)):
        if value < 1:
            raise CLIError(f"{name} must be >= 1, got {value}")
    src, dst = Path(src), Path(dst)
    _, store, fmt, _, _ = _open(src)
    existing = _layer_formats(store)
    if existing:
        raise CLIError(
            f"{src} already holds quantized layers ({len(existing)}, e.g. '{next(iter(existing))}': "
            f"{next(iter(existing.values()))}); calibrated rounding needs the float weights"
        )
    tokenizer = tokenizer_from_pretrained(src)
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    if ids.size < samples * length:
        raise CLIError(
            f"--calibration: the text has {ids.size} tokens, {samples} windows of {length} need {samples * length}; "
            "give more text or fewer/shorter windows"
        )
    windows = ids[: samples * length].reshape(samples, length)
    net = from_pretrained(src)
    family = "llm_int8" if quantize == "int8" else quantize
    rules = RuleSet.builtin(family)
    if quantize != "int8":
        rules = rules.copy(
            [r.with_changes(rewrite={"blocksize": blocksize, "double_quant": double_quant}) for r in rules]
        )
    t0 = time.perf_counter()
    result = apply(net, rules, calibration=[(ms.Tensor(w[None, :]),) for w in windows], progress=progress)
    seconds = time.perf_counter() - t0
    written = save_pretrained(net, dst, max_shard_size=max_shard_size)
    written += _copy_tokenizer(src, dst, fmt, tokenizer if fmt == "gguf" else None)
    ratios = [r.error_calibrated / r.error_nearest for r in result.quantized if r.error_nearest]
    return {
        "source": str(src),
        "source_format": fmt,
        "destination": str(dst),
        "quantized_layers": len(result.quantized),
        "calibration": {
            "tokens": int(windows.size),
            "windows": [samples, length],
            "seconds": round(seconds, 2),
            "layer_error_vs_round_to_nearest_median": float(np.median(ratios)) if ratios else None,
        },
        "files": [str(p) for p in written],
    }


def _cmd_convert(args: argparse.Namespace) -> int:
    progress = args.progress or sys.stderr.isatty()
    common = (args.double_quant, args.blocksize, args.max_shard_size, progress)
    if args.calibration is not None:
        text = calibration_text(args.calibration)
        summary = calibrated_convert(
            args.src, args.dst, args.quantize, text, args.calibration_samples, args.calibration_len, *common
        )
    else:
        summary = convert_checkpoint(args.src, args.dst, args.quantize, *common)
    print(json.dumps(summary, indent=2))
    return 0
