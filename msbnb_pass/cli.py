"""The ``msbnb`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from ._version import __version__

FORMATS = ("nf4", "fp4", "int4", "int8", "llm_int8")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize one weight matrix and report error, size and time",
        description="Quantize a weight (a .npy file, or a seeded random normal matrix) with one format and "
        "print its error against the float weight, its size and how long quantizing took.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--npy", metavar="FILE", help="a 2-D float .npy weight [out_features, in_features]")
    src.add_argument(
        "--shape",
        nargs=2,
        type=int,
        metavar=("OUT", "IN"),
        default=(1024, 1024),
        help="shape of a random N(0, 1) weight (default 1024 1024)",
    )
    p.add_argument("--format", choices=FORMATS, default="nf4", help="quantization format (default nf4)")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit block size, a power of two in [32, 4096]")
    p.add_argument("--double-quant", action="store_true", help="4-bit: double-quantize the absmax")
    p.add_argument("--asymmetric", action="store_true", help="int4/int8: asymmetric (min/max + offset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weight")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import numpy as np

    from . import formats
    from .functional import _error_metrics

    if args.npy:
        weight = np.load(args.npy)
    else:
        weight = np.random.default_rng(args.seed).standard_normal(tuple(args.shape), dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"--npy: the weight must be 2-D [out_features, in_features], got shape {weight.shape}")
    t0 = time.perf_counter()
    if args.format in ("nf4", "fp4", "int4"):
        packed, state = formats.quantize_4bit(
            weight, args.blocksize, args.format, args.double_quant, symmetric=not args.asymmetric
        )
        seconds = time.perf_counter() - t0
        approx = formats.dequantize_4bit(packed, state)
        nbytes = packed.nbytes + state.stats_nbytes
    elif args.format == "int8":
        q, scale, offset = formats.quantize_int8(weight, symmetric=not args.asymmetric)
        seconds = time.perf_counter() - t0
        approx = formats.dequantize_int8(q, scale, offset)
        nbytes = q.nbytes + scale.nbytes + (0 if offset is None else offset.nbytes)
    else:
        CB, SCB = formats.int8_vectorwise_quant(weight)
        seconds = time.perf_counter() - t0
        approx = formats.int8_vectorwise_dequant(CB, SCB)
        nbytes = CB.nbytes + SCB.nbytes
    report = {
        "format": args.format,
        "shape": list(weight.shape),
        "quantize_seconds": seconds,
        "bytes_fp32": int(weight.size * 4),
        "bytes_quantized": int(nbytes),
        "bits_per_weight": 8.0 * nbytes / weight.size,
        **_error_metrics(weight.astype(np.float32), approx),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            text = f"{value:.6g}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msbnb",
        description="bitsandbytes-style quantization for MindSpore, applied as a graph-rewrite pass.",
    )
    parser.add_argument("--version", action="version", version=f"msbnb_pass {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"msbnb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
