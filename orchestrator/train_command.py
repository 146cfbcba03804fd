"""``curvlt train CONFIG [--set key=value ...] [--resume [RUN_ID]]`` — one training run on Ray Train (SPEC §9)."""

from __future__ import annotations

import argparse

from orchestrator.config import add_overrides_argument, load_config
from orchestrator.run_resume import LATEST


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one configuration on Ray Train, tracked in MLflow",
                                   description="Train with a base loss (+ curvature regularization).")
    parser.add_argument("config", help="bundled config name (e.g. digits_lt) or path to a YAML file")
    add_overrides_argument(parser)
    parser.add_argument("--resume", nargs="?", const=LATEST, metavar="RUN_ID",
                        help="continue a stopped run from its last checkpoint, in its own MLflow run: the one "
                             "given, or the newest unfinished run of this config's experiment with the same config")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.trainer import summary_table, train

    config = load_config(args.config, args.overrides)
    outcome = train(config, resume=args.resume)
    print(summary_table(outcome))
    return 0
