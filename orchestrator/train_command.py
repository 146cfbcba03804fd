"""``curvlt train CONFIG [--set key=value ...]`` — one training run on Ray Train (SPEC §9)."""

from __future__ import annotations

import argparse

from orchestrator.config import add_overrides_argument, load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one configuration on Ray Train, tracked in MLflow",
                                   description="Train with a base loss (+ curvature regularization).")
    parser.add_argument("config", help="bundled config name (e.g. digits_lt) or path to a YAML file")
    add_overrides_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.trainer import summary_table, train

    config = load_config(args.config, args.overrides)
    outcome = train(config)
    print(summary_table(outcome))
    return 0
