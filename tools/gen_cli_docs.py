"""Write the generated part of docs/cli.md (every subcommand's --help) from the parser itself, so the
reference cannot drift from the code. `python tools/gen_cli_docs.py` rewrites it; `--check` exits 1 when
the file is out of date (tests/test_docs.py runs the check)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BEGIN = "<!-- BEGIN GENERATED: tools/gen_cli_docs.py -->"
END = "<!-- END GENERATED -->"
WIDTH = "100"


def reference() -> str:
    """Markdown: the top-level help, then one section per subcommand with its help text."""
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal; fix it so the text is reproducible
    from msbnb_pass.cli import build_parser

    parser = build_parser()
    parser.prog = "msbnb"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## `msbnb`", "", "```text", parser.format_help().rstrip(), "```"]
    for name, command in sub.choices.items():
        command.prog = f"msbnb {name}"
        parts += ["", f"## `msbnb {name}`", "", "```text", command.format_help().rstrip(), "```"]
    return "\n".join(parts)


def render(current: str) -> str:
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{reference()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    args = ap.parse_args(argv)
    current = DOC.read_text()
    if BEGIN not in current or END not in current:
        print(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing", file=sys.stderr)
        return 1
    new = render(current)
    if args.check:
        if new != current:
            print(f"{DOC} is out of date: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
