"""``curvlt tune NAME_OR_PATH [--set key=value ...] [--resume]`` — a sweep on Ray Tune (SPEC §9)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.config import add_overrides_argument
from orchestrator.errors import UserError
from orchestrator.search_space import count_trials, load_space


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="run a sweep from search_spaces/ on Ray Tune",
                                   description="Sweep a search space; each trial is one Ray Train run.")
    parser.add_argument("space", help="shipped search space name (e.g. quickstart) or path to a YAML file")
    add_overrides_argument(parser)
    parser.add_argument("--resume", action="store_true", help="resume the latest interrupted sweep of this space")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.compare import compare_experiment, render
    from orchestrator.sweep import run_sweep

    space = load_space(args.space, args.overrides)
    print(f"[curvlt] {space.name}: {count_trials(space)} trial(s) over {', '.join(space.base)}")
    outcome = run_sweep(space, args.overrides, args.resume)
    try:
        print(render(compare_experiment(outcome.experiment), "table"))
    except UserError as nothing_finished:  # stopped, or every trial failed, before one finished
        print(f"[curvlt] no table: {nothing_finished}")
    if outcome.interrupted:
        print(f"curvlt: sweep interrupted after {outcome.ended} of {outcome.trials} trials; continue it with "
              f"curvlt tune {args.space} --resume", file=sys.stderr)
        return 130
    if outcome.failed:
        print(f"curvlt: error: {outcome.failed} trial(s) failed (see above); fix and run again with --resume",
              file=sys.stderr)
        return 1
    return 0
