"""``curvlt compare [--experiment NAME [NAME ...]] [--group-by ...] [--format table|csv|json]`` (SPEC §9)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="compare finished runs of an MLflow experiment",
                                   description="Group runs, average over seeds, and plot accuracy vs CR weight.")
    parser.add_argument("--experiment", nargs="+", default=["curvlt-quickstart"], metavar="NAME",
                        help="MLflow experiment, or several whose runs are compared together, e.g. one sweep per "
                             "base loss (default: curvlt-quickstart)")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="PARAM",
                        help="config keys to group by (default: dataset.name loss.name cr.weight)")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                        "./mlflow.db)")
    parser.add_argument("--out", default="curvlt_compare", help="folder for the CSV and plots (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.compare import compare_experiment, render

    out_dir = Path(args.out) / "+".join(dict.fromkeys(args.experiment))
    table = compare_experiment(args.experiment, args.group_by, args.tracking_uri, out_dir)
    print(render(table, args.format))
    print(f"[curvlt] plots and CSV in {out_dir} (also logged to MLflow, in a 'compare' run of experiment "
          f"{args.experiment[0]!r})", file=sys.stderr)
    return 0
