"""``msbnb report MODEL --rules nf4 [--input-shape 2,16] -o report.html``: the pass as one HTML page.

Registered on the ``msbnb`` parser by :func:`add_report_command`. It takes the same model, rule and input
arguments as ``msbnb apply`` (the helpers that define and run them are handed in by ``cli.py``, so this
module does not import it back), runs the pass and writes ``PassResult.to_html``. Violations of a layer's
bound are reported on the page (``--on-violation warn``) rather than aborting, unless asked otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_report_command"]


def add_report_command(
    sub: argparse._SubParsersAction,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    add_allow_import: Callable[[argparse.ArgumentParser], None],
    run_pass: Callable[..., tuple[Any, Any]],
) -> None:
    p = sub.add_parser(
        "report",
        help="run the pass and write a self-contained HTML report (charts, verification, graph before/after)",
        description="Apply the rules like `msbnb apply` and write one self-contained HTML file: summary, the "
        "rules that fired, per-layer error against each format's bound, memory before/after, the verification "
        "table, the layers kept in full precision and the network graph before and after.",
    )
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    p.add_argument("--title", help="the page title (default: the network's class)")
    p.add_argument("--dry-run", action="store_true", help="report the plan only: match, change nothing")
    p.add_argument(
        "--on-violation",
        choices=("raise", "keep_float", "warn"),
        default="warn",
        help="a layer outside its bound: warn (default: keep it, flag it in the report), keep_float, or raise",
    )
    p.add_argument("--backend", choices=("cpu", "reference"))
    add_allow_import(p)
    p.set_defaults(func=functools.partial(_cmd_report, run_pass=run_pass))


def _cmd_report(args: argparse.Namespace, run_pass: Callable[..., tuple[Any, Any]]) -> int:
    from .outputs import check_output_file

    check_output_file(args.output, "-o/--output")  # before the model is built or the pass runs
    _, result = run_pass(args, dry_run=args.dry_run)
    path = result.to_html(args.output, title=args.title)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print(result.summary())
    print(f"wrote {path}", file=sys.stderr)
    return 0
