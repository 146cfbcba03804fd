"""``curvlt measure FEATURES`` — the per-class geometry table of a feature file (SPEC §9)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import UserError, make_folder

if TYPE_CHECKING:  # torch, pandas and the geometry engine load in run(): `curvlt --help` stays quick
    import pandas as pd

    from curvature.rotation import TangentDim

#: Seconds between progress lines while a large file is measured.
PROGRESS_EVERY_S = 10.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("measure", help="measure per-class manifold geometry of a feature file",
                                   description="Per-class count, volume, separation and curvature (SPEC §3).")
    parser.add_argument("features", nargs="?", help=".npz or .pt file with 'features' (n x p) and 'labels' (n)")
    parser.add_argument("--example", action="store_true",
                        help="measure the bundled example (spheres of known radius, one per class)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per point (default 10)")
    parser.add_argument("--tangent-dim", default="auto", help="tangent dimension: 'auto' or an integer")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"], help="kNN backend")
    parser.add_argument("--out", help="also write the table to this .csv or .json file")
    parser.set_defaults(run=run)


def _tangent_dim(text: str) -> TangentDim:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--tangent-dim: must be 'auto' or an integer, got {text!r}") from None


def _prepare_out(out: Path) -> None:
    """Before anything is measured (a large file takes minutes): a file type the table can be
    written as, and its folder, made if missing."""
    if out.suffix not in (".csv", ".json"):
        raise UserError(f"--out: unsupported extension {out.suffix!r}; use .csv or .json")
    make_folder(out.parent, f"--out {out}: cannot make its folder {out.parent}")


def _write(table: pd.DataFrame, out: Path) -> None:
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        table.to_json(out, orient="records", indent=2)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from curvature import class_geometry
    from orchestrator.features_io import load_features
    from orchestrator.measure_example import EXAMPLE_PATH
    from orchestrator.progress import ProgressLine

    if bool(args.features) == bool(args.example):
        raise UserError("measure: give exactly one of FEATURES or --example")
    path = EXAMPLE_PATH if args.example else Path(args.features)
    if args.out:
        _prepare_out(Path(args.out))
    features, labels = load_features(path)
    try:
        table = class_geometry(features, labels, k=args.k, tangent_dim=_tangent_dim(args.tangent_dim),
                               backend=args.backend, progress=ProgressLine(f"measuring {path.name}", PROGRESS_EVERY_S))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if args.example:
        with np.load(path) as archive:
            table["true_kappa"] = 1.0 / archive["radius"][table["label"].to_numpy()]
    print(f"{path}: {features.shape[0]} points, {features.shape[1]} dims, {table.shape[0]} classes, k={args.k}")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    if args.out:
        _write(table, Path(args.out))
        print(f"wrote {args.out}")
    return 0
