"""``curvlt measure FEATURES | --example | --checkpoint FOLDER|URI`` — the per-class geometry table of a
feature file, of the bundled example, or of a trained run's model (SPEC §9)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import UserError, make_folder

if TYPE_CHECKING:  # torch, pandas and the geometry engine load in run(): `curvlt --help` stays quick
    import pandas as pd
    from numpy.typing import ArrayLike

    from curvature.neighbours import Backend
    from curvature.rotation import TangentDim

#: Seconds between progress lines while a large file is measured.
PROGRESS_EVERY_S = 10.0
#: Neighbours per point and tangent dimension for a feature file (a checkpoint: its run's own).
DEFAULT_K: int = 10
DEFAULT_TANGENT_DIM: TangentDim = "auto"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("measure", help="measure per-class manifold geometry of a feature file or of a "
                                   "trained run's model", description="Per-class count, volume, separation and "
                                   "curvature (SPEC §3).")
    parser.add_argument("features", nargs="?", help=".npz or .pt file with 'features' (n x p) and 'labels' (n)")
    parser.add_argument("--example", action="store_true",
                        help="measure the bundled example (spheres of known radius, one per class)")
    parser.add_argument("--checkpoint", metavar="FOLDER",
                        help="measure the features a curvlt run's model gives on its own data: a checkpoint folder "
                             "(the 'checkpoint:' line curvlt train ends with; MLflow tag curvlt.checkpoint), local "
                             "or a URI such as s3://bucket/... where checkpoint.storage_path was one")
    parser.add_argument("--split",
                        help="with --checkpoint: 'train' (default: the training images its geometry epochs measure, "
                             "eval.geometry_max_points per class) or 'test'")
    parser.add_argument("--save-features", metavar="FILE.npz",
                        help="with --checkpoint: also save the features and labels, as a file curvlt measure reads")
    parser.add_argument("--k", type=int, help=f"neighbours per point (default {DEFAULT_K}; with --checkpoint, its "
                                              "run's eval.geometry_k)")
    parser.add_argument("--tangent-dim", help="tangent dimension: 'auto' or an integer (default "
                                              f"{DEFAULT_TANGENT_DIM}; with --checkpoint, its run's "
                                              "eval.geometry_tangent_dim)")
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


def _prepare_output(option: str, path: Path, suffixes: tuple[str, ...]) -> None:
    """Before anything is computed (a large file or model takes minutes): a file type it can be
    written as, and its folder, made if missing."""
    if path.suffix not in suffixes:
        raise UserError(f"{option}: unsupported extension {path.suffix!r}; use {' or '.join(suffixes)}")
    make_folder(path.parent, f"{option} {path}: cannot make its folder {path.parent}")


def _write(table: pd.DataFrame, out: Path) -> None:
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        table.to_json(out, orient="records", indent=2)


def _class_geometry(features: ArrayLike, labels: ArrayLike, k: int, tangent_dim: TangentDim, backend: Backend,
                    what: str) -> pd.DataFrame:
    from curvature import class_geometry
    from orchestrator.progress import ProgressLine

    try:
        return class_geometry(features, labels, k=k, tangent_dim=tangent_dim, backend=backend,
                              progress=ProgressLine(f"measuring {what}", PROGRESS_EVERY_S))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _measure_file(args: argparse.Namespace, k: int | None,
                  tangent_dim: TangentDim | None) -> tuple[str, pd.DataFrame, list[str]]:
    """A feature file, or the bundled example with each class's true curvature beside."""
    import numpy as np

    from orchestrator.features_io import load_features
    from orchestrator.measure_example import EXAMPLE_PATH

    path = EXAMPLE_PATH if args.example else Path(args.features)
    features, labels = load_features(path)
    k = DEFAULT_K if k is None else k
    tangent_dim = DEFAULT_TANGENT_DIM if tangent_dim is None else tangent_dim
    table = _class_geometry(features, labels, k, tangent_dim, args.backend, path.name)
    if args.example:
        with np.load(path) as archive:
            table["true_kappa"] = 1.0 / archive["radius"][table["label"].to_numpy()]
    heading = f"{path}: {features.shape[0]} points, {features.shape[1]} dims, {table.shape[0]} classes, k={k}"
    return heading, table, []


def _measure_checkpoint(args: argparse.Namespace, k: int | None,
                        tangent_dim: TangentDim | None) -> tuple[str, pd.DataFrame, list[str]]:
    """A run's model on its own data: the table with each class's test accuracy, and the metrics
    its geometry epochs log (``geometry/`` for the training split, ``geometry_test/`` for the test
    split; equal to the logged ones when measured as the run measured them)."""
    import numpy as np

    from orchestrator.checkpoint_features import checkpoint_features
    from orchestrator.evaluation import GEOMETRY_PREFIXES, correlation_metrics

    split = args.split or "train"
    trained = checkpoint_features(args.checkpoint, split)
    features, labels = trained.features.features, trained.features.labels
    if args.save_features:  # before measuring, which may take long
        np.savez(args.save_features, features=features.numpy(), labels=labels.numpy())
    k = trained.config.eval.geometry_k if k is None else k
    tangent_dim = trained.config.eval.geometry_tangent_dim if tangent_dim is None else tangent_dim
    table = _class_geometry(features, labels, k, tangent_dim, args.backend, f"{split} features")
    present = table["label"].to_numpy()
    table.insert(2, "test_accuracy", trained.test_accuracy[present])
    if trained.true_curvature is not None:
        table["true_curvature"] = trained.true_curvature[present]
    metrics = correlation_metrics(table, trained.test_accuracy, GEOMETRY_PREFIXES[split])
    config = trained.config
    heading = (f"{args.checkpoint}: {config.dataset.name}, {config.model.name}, after epoch "
               f"{trained.epoch}/{config.train.epochs}; {split} features: {features.shape[0]} points, "
               f"{features.shape[1]} dims, {table.shape[0]} classes, k={k}, tangent dim {tangent_dim}")
    return heading, table, [f"  {name:40s} {value:.4f}" for name, value in metrics.items()]


def run(args: argparse.Namespace) -> int:
    if sum([bool(args.features), args.example, bool(args.checkpoint)]) != 1:
        raise UserError("measure: give exactly one of FEATURES, --example or --checkpoint")
    for option, given in (("--split", args.split), ("--save-features", args.save_features)):
        if given and not args.checkpoint:
            raise UserError(f"{option}: only with --checkpoint")
    # Options checked before minutes of work; None: the default of what is measured.
    if args.k is not None and args.k < 1:
        raise UserError(f"--k: must be a positive integer, got {args.k}")
    tangent_dim = None if args.tangent_dim is None else _tangent_dim(args.tangent_dim)
    if args.out:
        _prepare_output("--out", Path(args.out), (".csv", ".json"))
    if args.save_features:
        _prepare_output("--save-features", Path(args.save_features), (".npz",))
    measure = _measure_checkpoint if args.checkpoint else _measure_file
    heading, table, metrics = measure(args, args.k, tangent_dim)
    print(heading)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    for line in metrics:
        print(line)
    if args.save_features:
        print(f"wrote {args.save_features}")
    if args.out:
        _write(table, Path(args.out))
        print(f"wrote {args.out}")
    return 0
