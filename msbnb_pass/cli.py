"""The ``msbnb`` command line: argument parsing and printing.

Exit codes: 0 success; 1 ``verify`` found the outputs below ``--min-cosine``; 2 a usage or input error
(a bad argument, model, rule file, config, output path or checkpoint), reported as one line on stderr
without a traceback. Output paths are checked before any work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .cli_demo import add_demo_command
from .cli_finetune import add_finetune_command
from .cli_generate import add_generate_command
from .cli_memory import add_memory_commands
from .cli_models import add_model_commands
from .cli_report import add_report_command
from .errors import CLIError, MsbnbError

EXIT_OK, EXIT_BELOW_MIN_COSINE, EXIT_USAGE = 0, 1, 2
INPUT_DTYPES = ("float32", "float16", "float64", "int32", "int64")

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
        try:
            weight = np.load(args.npy, allow_pickle=False)
        except ValueError as exc:
            raise CLIError(f"--npy {args.npy}: not a numpy .npy array ({exc})") from None
    else:
        if any(d < 1 for d in args.shape):
            raise CLIError(f"--shape must be two positive integers OUT IN, got {args.shape[0]} {args.shape[1]}")
        weight = np.random.default_rng(args.seed).standard_normal(tuple(args.shape), dtype=np.float32)
    if weight.ndim != 2:
        raise CLIError(f"--npy: the weight must be 2-D [out_features, in_features], got shape {weight.shape}")
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
def load_model(spec: str) -> Any:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the Cell the factory returns."""
    import importlib
    import importlib.util
    import os

    from mindspore import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"--model must look like 'package.module:factory' or 'file.py:factory', got {spec!r}")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.exists(path):
            raise CLIError(f"--model: no such file {module_name!r}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise CLIError(f"--model: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CLIError(f"--model: cannot import {module_name!r}: {exc}") from exc
        except Exception as exc:
            raise CLIError(f"--model: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise CLIError(f"--model: module {module_name!r} has no attribute {attr!r}")
    if callable(factory) and not isinstance(factory, nn.Cell):
        try:
            net = factory()
        except Exception as exc:
            raise CLIError(f"--model: calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    else:
        net = factory
    if not isinstance(net, nn.Cell):
        raise CLIError(f"--model: {spec} returned {type(net).__name__}, not a mindspore.nn.Cell")
    return net


def _load_config(path: str):
    from .config import BitsAndBytesConfig, Int4Config, Int8Config

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read())
    except OSError as exc:
        raise CLIError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"--config {path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "quantization_config" in data:  # a transformers config.json
        data = data["quantization_config"]
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    try:
        if "bits" in data:
            return (Int8Config if data["bits"] == 8 else Int4Config).from_dict(data)
        config, unused = BitsAndBytesConfig.from_dict(data, return_unused_kwargs=True)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--config {path}: {exc}") from None
    if unused:  # a file the user wrote: a misspelt key must not be ignored silently
        from .config import _unknown_arguments

        raise CLIError(f"--config {path}: {_unknown_arguments('BitsAndBytesConfig', unused)}")
    return config


def _rules(args):
    from .config_rules import resolve_rules

    if args.config and args.rules:
        raise CLIError("give either --config or --rules, not both")
    if args.config:
        return _load_config(args.config)
    if args.rules:
        return resolve_rules(list(args.rules), allow_imports=getattr(args, "allow_import", None) or ())
    raise CLIError("say what to apply: --rules FAMILY_OR_TOML ... (e.g. --rules nf4) or --config quant.json")


def _inputs(args):
    import mindspore as ms
    import numpy as np

    shapes = _input_shapes(args)
    if not shapes:
        return None
    rng = np.random.default_rng(args.seed)
    out = []
    for shape in shapes:
        if args.input_dtype.startswith("int"):
            out.append(ms.Tensor(rng.integers(0, args.input_max, shape).astype(args.input_dtype)))
        else:
            out.append(ms.Tensor(rng.standard_normal(shape).astype(args.input_dtype)))
    return tuple(out)


def _input_shapes(args) -> list[tuple[int, ...]]:
    """--input-shape/--input-dtype/--input-max checked before anything runs."""
    if not hasattr(args, "input_dtype"):  # a command without generated inputs
        return []
    if args.input_dtype not in INPUT_DTYPES:
        raise CLIError(f"--input-dtype must be one of {list(INPUT_DTYPES)}, got {args.input_dtype!r}")
    if args.input_max < 1:
        raise CLIError(f"--input-max must be a positive integer, got {args.input_max}")
    shapes = []
    for text in args.input_shape or ():
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise CLIError(f"--input-shape must look like 2,16 (comma or x separated), got {text!r}") from None
        if not shape or any(d < 1 for d in shape):
            raise CLIError(f"--input-shape {text}: every dimension must be a positive integer, got {list(shape)}")
        shapes.append(shape)
    return shapes


def _prepare(args):
    import mindspore as ms

    ms.set_device("CPU")
    net = load_model(args.model)
    if args.ckpt:
        from .errors import CheckpointError

        try:
            params = ms.load_checkpoint(args.ckpt)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"--ckpt {args.ckpt}: cannot read it as a MindSpore checkpoint ({exc})") from None
        missing = ms.load_param_into_net(net, params)
        if missing and missing[0]:
            raise CheckpointError(f"--ckpt {args.ckpt}: parameters not in the checkpoint: {missing[0][:5]}")
    return net


def save_checkpoint_atomic(net, path: str) -> None:
    """Save to a temporary file beside ``path`` and move it into place: a failed write keeps the old file,
    and a target that is not a regular file (``/dev/null``, a FIFO, a directory) is refused."""
    import mindspore as ms

    from .outputs import write_atomic

    def write(tmp: str) -> None:
        ms.save_checkpoint(net, tmp)

    write_atomic(path, write, "-o/--output")


def _check_outputs(args) -> None:
    """Every output path is checked before the model is built or the pass runs."""
    from .outputs import check_output_dir, check_output_file

    command = args.command
    if command == "apply":
        if args.output and not args.dry_run:
            check_output_file(args.output, "-o/--output")
        if args.dump:
            check_output_dir(args.dump, "--dump")
        if args.html:
            check_output_file(args.html, "--html")
    elif command == "dump":
        if args.output:
            check_output_dir(args.output, "-o/--output")
        if args.ir:
            check_output_dir(args.ir, "--ir")


def _run_pass(args, dry_run: bool = False):
    from .passes import apply

    rules = _rules(args)
    sample_inputs = _inputs(args)
    net = _prepare(args)
    result = apply(
        net,
        rules,
        sample_inputs=sample_inputs,
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
    if args.html:
        print(f"wrote {result.to_html(args.html)}", file=sys.stderr)
    if args.output and not args.dry_run:
        save_checkpoint_atomic(net, args.output)
        print(f"saved the quantized checkpoint to {args.output}", file=sys.stderr)
    return 0


def _cmd_explain(args) -> int:
    _, result = _run_pass(args, dry_run=True)
    paths = [d.path for d in result.trace.decisions]
    if args.layer is not None and args.layer not in paths:
        from .errors import closest

        near = closest(args.layer, paths)
        hint = f"; closest: {', '.join(near)}" if near else f"; weight-holding layers: {', '.join(paths[:8])}"
        raise CLIError(f"--layer {args.layer!r} is not a weight-holding layer of {args.model}{hint}")
    if args.json:
        print(json.dumps(result.trace.to_dict(), indent=1))
    else:
        print(result.trace.explain(args.layer))
    return 0


def _cmd_dump(args) -> int:
    from pathlib import Path

    from .dump import dump, dump_ir, write_dumps
    from .graph import build_graph
    from .outputs import write_text_atomic

    if args.ir and not args.input_shape:
        raise CLIError("--ir needs --input-shape to compile the network")
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
                write_text_atomic(p, dump(graph, fmt), "dump file")
                paths.append(p)
        for p in paths:
            print(f"wrote {p}")
    else:
        print(dump(graph, "text" if args.format == "all" else args.format, result))
    if args.ir:
        inputs = _inputs(args)
        files = dump_ir(net, inputs, args.ir)
        print(f"wrote {len(files)} IR file(s) to {args.ir}")
    return 0


def _cmd_verify(args) -> int:
    """One instance of the model, a deep copy of it quantized, both run on the same seeded inputs."""
    import copy

    from .passes import apply
    from .verify import verify

    if not args.input_shape:
        raise CLIError("verify needs --input-shape to generate its inputs (e.g. --input-shape 2,16)")
    rules = _rules(args)
    inputs = _inputs(args)
    original = _prepare(args)
    try:
        rewritten = copy.deepcopy(original)
    except Exception as exc:
        raise CLIError(
            f"verify: cannot deep-copy the network built by {args.model}: {type(exc).__name__}: {exc}"
        ) from None
    result = apply(rewritten, rules, sample_inputs=inputs, on_violation=args.on_violation)
    metrics = verify(original, rewritten, inputs)
    shapes = " ".join(args.input_shape)
    print(
        f"verify: built {args.model} once, quantized a deep copy, compared both on the same inputs "
        f"(shape {shapes}, {args.input_dtype}, seed {args.seed})"
    )
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
    from .rules import BUILTIN_FAMILIES, RuleSet, as_ruleset

    allow = args.allow_import or ()
    rules = as_ruleset(list(args.rules), allow_imports=allow) if args.rules else RuleSet.builtin(*BUILTIN_FAMILIES)
    if args.json:
        print(json.dumps(rules.describe(), indent=1))
        return 0
    for r in rules.describe():
        print(
            f"{r['name']:<22} pattern={r['pattern']:<18} level={r['level']:<5} priority={r['priority']:<4} "
            f"rewrite={r['rewrite']} where={r['where']}  ({r['source']})"
        )
    print(
        f"\nreplacements: {', '.join(rules.known_replacements())}; patterns: {', '.join(sorted(rules.patterns))}; "
        f"Linear-like classes: {', '.join(rules.linear_classes())}"
    )
    return 0


def _add_allow_import(p) -> None:
    p.add_argument(
        "--allow-import",
        action="append",
        metavar="PREFIX",
        help="let TOML rule files import modules under this prefix (e.g. mypkg) to find the classes they name; "
        "without it, reading a rule file imports nothing (repeatable)",
    )


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
    p.add_argument("--html", metavar="FILE", help="also write the HTML report (as `msbnb report` does) to FILE")
    p.add_argument("--dry-run", action="store_true", help="match and report, change nothing")
    p.add_argument("--on-violation", choices=("raise", "keep_float", "warn"), default="raise")
    p.add_argument("--backend", choices=("cpu", "reference"))
    _add_allow_import(p)
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
    _add_allow_import(p)
    p.set_defaults(func=_cmd_dump)
    p = sub.add_parser("verify", help="quantize a copy and compare it with the float network end to end")
    _add_model_args(p)
    p.add_argument("--on-violation", choices=("raise", "keep_float", "warn"), default="warn")
    p.add_argument("--min-cosine", type=float, help="exit with status 1 below this output cosine similarity")
    _add_allow_import(p)
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("rules", help="list the built-in rules, or the rules in TOML files")
    p.add_argument("rules", nargs="*", help="families or TOML files (default: every built-in family)")
    p.add_argument("--json", action="store_true")
    _add_allow_import(p)
    p.set_defaults(func=_cmd_rules)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msbnb",
        description="bitsandbytes-style quantization for MindSpore, applied as a graph-rewrite pass.",
        epilog="exit codes: 0 success; 1 verify: outputs below --min-cosine; 2 usage or input error "
        "(one line on stderr, no traceback)",
    )
    parser.add_argument("--version", action="version", version=f"msbnb_pass {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize(sub)
    _add_pass_commands(sub)
    add_model_commands(sub)
    add_memory_commands(sub)
    add_generate_command(sub)
    add_report_command(sub, _add_model_args, _add_allow_import, _run_pass)
    add_finetune_command(sub)
    add_demo_command(sub)
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
        _check_outputs(args)
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"msbnb {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"msbnb {args.command}: interrupted", file=sys.stderr)
        return 130


# What a user's input can cause: reported as one line and exit status 2, never as a traceback.
USER_ERRORS = (
    MsbnbError,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    re.error,
    UnicodeError,
    tomllib.TOMLDecodeError,
    ImportError,
    RuntimeError,
)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    if not isinstance(exc, MsbnbError) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
