"""The ``curvlt`` command line: one entry point, one sub-command per job (SPEC §9)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

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
    Ctrl-C (and SIGTERM, SIGHUP) exit status 130."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
        for name in ("SIGTERM", "SIGHUP"):  # SIGHUP: not on Windows
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _as_ctrl_c)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"curvlt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was stopped has said how to resume it; no traceback
        print("curvlt: interrupted", file=sys.stderr)
        return 130


def _as_ctrl_c(signum: int, frame) -> None:
    """SIGTERM (a scheduler preempting the job, ``kill``) and SIGHUP (a closed terminal) do what
    Ctrl-C does, instead of ending the process at once: Ray Train's and Ray Tune's own SIGINT
    handlers stop the run or sweep, whose MLflow runs end ``KILLED`` and resumable with
    ``--resume``; elsewhere it is a ``KeyboardInterrupt``."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (a background job) or set outside Python
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


if __name__ == "__main__":
    sys.exit(main())
