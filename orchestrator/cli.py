"""The ``curvlt`` command line: one entry point, one sub-command per job (SPEC §9)."""

from __future__ import annotations

import argparse
import sys

from orchestrator import compare_command, measure_command, submit_command, train_command, tune_command
from orchestrator.errors import UserError

COMMANDS = [measure_command, train_command, tune_command, compare_command, submit_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlt", description="Geometry of class feature manifolds and "
                                     "curvature-regularized long-tailed training.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a ``UserError`` becomes ``curvlt: error: <message>`` and exit status 2,
    Ctrl-C exit status 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"curvlt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was stopped has said how to resume it; no traceback
        print("curvlt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
