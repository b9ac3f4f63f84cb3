"""The ``msbnb`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from ._version import __version__
from .cli_models import add_model_commands

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


# ---- model-level commands -------------------------------------------------------------------------------------
def load_model(spec: str):
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the Cell the factory returns."""
    import importlib
    import importlib.util
    import os

    from mindspore import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:factory' or 'file.py:factory', got {spec!r}")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model: no such file {module_name!r}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"--model: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"--model: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"--model: module {module_name!r} has no attribute {attr!r}")
    if callable(factory) and not isinstance(factory, nn.Cell):
        try:
            net = factory()
        except Exception as exc:
            raise ValueError(f"--model: calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    else:
        net = factory
    if not isinstance(net, nn.Cell):
        raise ValueError(f"--model: {spec} returned {type(net).__name__}, not a mindspore.nn.Cell")
    return net


def _load_config(path: str):
    from .config import BitsAndBytesConfig, Int4Config, Int8Config

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not valid JSON ({exc})") from None
    if "quantization_config" in data:  # a transformers config.json
        data = data["quantization_config"]
    if "bits" in data:
        return (Int8Config if data["bits"] == 8 else Int4Config).from_dict(data)
    return BitsAndBytesConfig.from_dict(data)


def _rules(args):
    from .rules import as_ruleset

    if args.config and args.rules:
        raise ValueError("give either --config or --rules, not both")
    if args.config:
        return _load_config(args.config)
    if args.rules:
        return as_ruleset(list(args.rules))
    raise ValueError("say what to apply: --rules FAMILY_OR_TOML ... (e.g. --rules nf4) or --config quant.json")


def _inputs(args):
    import mindspore as ms
    import numpy as np

    if not args.input_shape:
        return None
    rng = np.random.default_rng(args.seed)
    out = []
    for text in args.input_shape:
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v)
        except ValueError:
            raise ValueError(f"--input-shape must look like 2,16 (comma or x separated), got {text!r}") from None
        if args.input_dtype.startswith("int"):
            out.append(ms.Tensor(rng.integers(0, args.input_max, shape).astype(args.input_dtype)))
        else:
            out.append(ms.Tensor(rng.standard_normal(shape).astype(args.input_dtype)))
    return tuple(out)


def _prepare(args):
    import mindspore as ms

    ms.set_device("CPU")
    net = load_model(args.model)
    if args.ckpt:
        missing = ms.load_param_into_net(net, ms.load_checkpoint(args.ckpt))
        if missing and missing[0]:
            raise ValueError(f"--ckpt {args.ckpt}: parameters not in the checkpoint: {missing[0][:5]}")
    return net


def save_checkpoint_atomic(net, path: str) -> None:
    """Save to a temporary file beside ``path`` and move it into place: a failed write keeps the old file."""
    import os
    import tempfile

    import mindspore as ms

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".msbnb-", suffix=".ckpt", dir=directory)
    os.close(fd)
    try:
        ms.save_checkpoint(net, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _run_pass(args, dry_run: bool = False):
    from .passes import apply

    net = _prepare(args)
    result = apply(
        net,
        _rules(args),
        sample_inputs=_inputs(args),
        dry_run=dry_run,
        on_violation=getattr(args, "on_violation", "raise"),
        backend=getattr(args, "backend", None),
        progress=True if sys.stderr.isatty() else False,
    )
    return net, result


def _cmd_apply(args) -> int:
    from .dump import write_dumps

    net, result = _run_pass(args, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print(result.summary())
        if result.report.layers:
            print()
            print(result.report.table())
    if args.dump:
        for path in write_dumps(result, args.dump):
            print(f"wrote {path}", file=sys.stderr)
    if args.output and not args.dry_run:
        save_checkpoint_atomic(net, args.output)
        print(f"saved the quantized checkpoint to {args.output}", file=sys.stderr)
    return 0


def _cmd_explain(args) -> int:
    _, result = _run_pass(args, dry_run=True)
    if args.json:
        print(json.dumps(result.trace.to_dict(), indent=1))
    else:
        print(result.trace.explain(args.layer))
    return 0


def _cmd_dump(args) -> int:
    from pathlib import Path

    from .dump import dump, dump_ir, write_dumps
    from .graph import build_graph

    if args.rules or args.config:
        net, result = _run_pass(args)
        graph = result.graph_after
    else:
        net, result = _prepare(args), None
        graph = build_graph(net)
    if args.output:
        if result is not None:
            paths = write_dumps(
                result, args.output, (args.format,) if args.format != "all" else ("text", "json", "dot")
            )
        else:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            fmts = ("text", "json", "dot") if args.format == "all" else (args.format,)
            paths = []
            for fmt in fmts:
                p = Path(args.output) / f"graph.{ {'text': 'txt'}.get(fmt, fmt) }"
                p.write_text(dump(graph, fmt), encoding="utf-8")
                paths.append(p)
        for p in paths:
            print(f"wrote {p}")
    else:
        print(dump(graph, "text" if args.format == "all" else args.format, result))
    if args.ir:
        inputs = _inputs(args)
        if inputs is None:
            raise ValueError("--ir needs --input-shape to compile the network")
        files = dump_ir(net, inputs, args.ir)
        print(f"wrote {len(files)} IR file(s) to {args.ir}")
    return 0


def _cmd_verify(args) -> int:
    from .passes import apply
    from .verify import verify

    inputs = _inputs(args)
    if inputs is None:
        raise ValueError("verify needs --input-shape")
    original = _prepare(args)
    rewritten = _prepare(args)
    result = apply(rewritten, _rules(args), sample_inputs=inputs, on_violation=args.on_violation)
    metrics = verify(original, rewritten, inputs)
    print(result.report.table())
    print(
        json.dumps(metrics, indent=1, default=str)
        if args.json
        else f"end to end: cosine {metrics['cosine']:.6f}, relative error {metrics['relative_error']:.4g}, "
        f"SQNR {metrics['sqnr_db']:.2f} dB"
    )
    if args.min_cosine is not None and metrics["cosine"] < args.min_cosine:
        print(f"msbnb verify: cosine {metrics['cosine']:.6f} is below --min-cosine {args.min_cosine}", file=sys.stderr)
        return 1
    return 0


def _cmd_rules(args) -> int:
    from .rules import BUILTIN_FAMILIES, RuleSet, as_ruleset, known_replacements

    rules = as_ruleset(list(args.rules)) if args.rules else RuleSet.builtin(*BUILTIN_FAMILIES)
    if args.json:
        print(json.dumps(rules.describe(), indent=1))
        return 0
    for r in rules.describe():
        print(
            f"{r['name']:<22} pattern={r['pattern']:<18} level={r['level']:<5} priority={r['priority']:<4} "
            f"rewrite={r['rewrite']} where={r['where']}  ({r['source']})"
        )
    print(f"\nreplacements: {', '.join(known_replacements())}; patterns: {', '.join(sorted(rules.patterns))}")
    return 0


def _add_model_args(p, rules: bool = True, inputs: bool = True) -> None:
    p.add_argument("model", help="the network: package.module:factory or file.py:factory (a callable returning a Cell)")
    p.add_argument("--ckpt", help="a MindSpore checkpoint to load into the network first")
    if rules:
        p.add_argument(
            "--rules",
            nargs="+",
            metavar="RULES",
            help="built-in families (nf4, fp4, int4, int8, llm_int8) and/or TOML rule files",
        )
        p.add_argument("--config", help="a JSON BitsAndBytesConfig (or transformers config.json) or QuantConfig")
    if inputs:
        p.add_argument("--input-shape", nargs="+", metavar="SHAPE", help="probe/sample input shape(s), e.g. 2,16")
        p.add_argument("--input-dtype", default="float32", help="dtype of the generated inputs (float32, int32, ...)")
        p.add_argument("--input-max", type=int, default=100, help="integer inputs are drawn from [0, input-max)")
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_pass_commands(sub) -> None:
    p = sub.add_parser("apply", help="quantize a network by rules or a config; report and save it")
    _add_model_args(p)
    p.add_argument("-o", "--output", help="save the quantized network's checkpoint here")
    p.add_argument("--dump", metavar="DIR", help="write before/after graph dumps (text, json, dot) into DIR")
    p.add_argument("--dry-run", action="store_true", help="match and report, change nothing")
    p.add_argument("--on-violation", choices=("raise", "keep_float", "warn"), default="raise")
    p.add_argument("--backend", choices=("cpu", "reference"))
    p.set_defaults(func=_cmd_apply)
    p = sub.add_parser("explain", help="for every weight-holding layer: which rule rewrites it, or why not")
    _add_model_args(p, inputs=False)
    p.add_argument("--layer", help="only this dotted path")
    p.set_defaults(func=_cmd_explain, input_shape=None)
    p = sub.add_parser("dump", help="the network graph (after the pass when rules are given) as text/json/dot")
    _add_model_args(p)
    p.add_argument("--format", choices=("text", "json", "dot", "all"), default="text")
    p.add_argument("-o", "--output", metavar="DIR", help="write files into DIR instead of printing")
    p.add_argument("--ir", metavar="DIR", help="also compile in GRAPH_MODE and save MindSpore's IR files into DIR")
    p.set_defaults(func=_cmd_dump)
    p = sub.add_parser("verify", help="quantize a copy and compare it with the float network end to end")
    _add_model_args(p)
    p.add_argument("--on-violation", choices=("raise", "keep_float", "warn"), default="warn")
    p.add_argument("--min-cosine", type=float, help="exit with status 1 below this output cosine similarity")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("rules", help="list the built-in rules, or the rules in TOML files")
    p.add_argument("rules", nargs="*", help="families or TOML files (default: every built-in family)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rules)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msbnb",
        description="bitsandbytes-style quantization for MindSpore, applied as a graph-rewrite pass.",
    )
    parser.add_argument("--version", action="version", version=f"msbnb_pass {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize(sub)
    _add_pass_commands(sub)
    add_model_commands(sub)
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
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"msbnb {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
