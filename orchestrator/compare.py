"""Comparison across runs (SPEC §8): runs grouped by (dataset, loss, CR weight) by default,
mean ± std over seeds, shot groups, curvature imbalance and the gain over the same dataset and
loss without CR; as a table, CSV or JSON, and as plots logged to MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.errors import UserError  # noqa: E402
from orchestrator.tracking import RUN_KEY_TAG, check_store_exists, client, find_run, resolve_tracking_uri  # noqa: E402

DEFAULT_GROUP_BY = ["dataset.name", "loss.name", "cr.weight"]
COLUMN_NAMES = {"dataset.name": "dataset", "loss.name": "loss", "cr.weight": "cr_weight"}
FINAL_METRICS = {"acc": "test/acc", "acc_many": "test/acc_many", "acc_medium": "test/acc_medium",
                 "acc_few": "test/acc_few", "curvature_imbalance": "geometry/curvature_imbalance"}
COMPARE_KEY = "compare"


def runs_frame(experiment: str, uri: str) -> pd.DataFrame:
    """One row per FINISHED training run: all params plus the final headline metrics."""
    found = client(uri).get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"--experiment: no MLflow experiment named {experiment!r} at {uri.split('@')[-1]}")
    runs = client(uri).search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                   max_results=5000)
    rows = []
    for run in runs:
        if run.data.tags.get(RUN_KEY_TAG) == COMPARE_KEY:
            continue
        row = {"run_id": run.info.run_id, **run.data.params}
        row.update({name: run.data.metrics.get(key, np.nan) for name, key in FINAL_METRICS.items()})
        rows.append(row)
    if not rows:
        raise UserError(f"--experiment: {experiment!r} has no finished runs yet")
    frame = pd.DataFrame(rows)
    if "cr.weight" in frame:
        frame["cr.weight"] = frame["cr.weight"].astype(float)
    return frame


def compare_runs(frame: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    missing = [key for key in group_by if key not in frame]
    if missing:
        raise UserError(f"--group-by: {missing[0]!r} is not a logged param; try one of "
                        f"{', '.join(sorted(c for c in frame.columns if '.' in c)[:12])}, ...")
    grouped = frame.groupby(group_by, dropna=False)
    table = grouped.agg(n_runs=("run_id", "count"), acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                        acc_many_mean=("acc_many", "mean"), acc_medium_mean=("acc_medium", "mean"),
                        acc_few_mean=("acc_few", "mean"),
                        curvature_imbalance_mean=("curvature_imbalance", "mean")).reset_index()
    table["acc_std"] = table["acc_std"].fillna(0.0)
    table["delta_acc_vs_no_cr"] = np.nan
    if {"dataset.name", "loss.name", "cr.weight"} <= set(group_by):
        baseline = table[table["cr.weight"] == 0.0].set_index(["dataset.name", "loss.name"])["acc_mean"]
        keys = list(zip(table["dataset.name"], table["loss.name"]))
        table["delta_acc_vs_no_cr"] = [row - baseline.get(key, np.nan) for row, key in zip(table["acc_mean"], keys)]
    return table.rename(columns=COLUMN_NAMES).sort_values([COLUMN_NAMES.get(k, k) for k in group_by])


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":
        return table.to_json(orient="records", indent=2)
    if fmt == "csv":
        return table.to_csv(index=False)
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def plot_accuracy_vs_weight(table: pd.DataFrame, path: Path) -> Path:
    datasets = sorted(table["dataset"].unique()) if "dataset" in table else []
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        subset = table[table["dataset"] == dataset]
        for loss, rows in subset.groupby("loss"):
            rows = rows.sort_values("cr_weight")
            ax.errorbar(rows["cr_weight"], 100 * rows["acc_mean"], yerr=100 * rows["acc_std"], marker="o",
                        capsize=3, label=loss)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("CR weight λ")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_correlations(frame: pd.DataFrame, uri: str, path: Path) -> Path:
    """Mean Pearson r (class accuracy vs curvature) per epoch for each (dataset, loss, weight)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    keys = [k for k in DEFAULT_GROUP_BY if k in frame]
    for group, rows in frame.groupby(keys):
        curves = []
        for run_id in rows["run_id"]:
            history = client(uri).get_metric_history(run_id, "geometry/corr_acc_curvature")
            curves.append(pd.Series({m.step: m.value for m in history}, dtype=float))
        if curves and any(len(c) for c in curves):
            mean = pd.concat(curves, axis=1).mean(axis=1).sort_index()
            ax.plot(mean.index + 1, mean.values, marker="o", label=" / ".join(map(str, group)))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Pearson r (accuracy, curvature)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_comparison(experiment: str, uri: str, frame: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Save the table and plots under ``out_dir`` and log them to the experiment's "compare" run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "comparison.csv"]
    table.to_csv(paths[0], index=False)
    if {"dataset", "loss", "cr_weight"} <= set(table.columns):
        paths.append(plot_accuracy_vs_weight(table, out_dir / "accuracy_vs_weight.png"))
    paths.append(plot_correlations(frame, uri, out_dir / "correlation_curves.png"))
    existing = find_run(uri, experiment, COMPARE_KEY)
    if existing is not None:
        run_id = existing.info.run_id
    else:
        experiment_id = client(uri).get_experiment_by_name(experiment).experiment_id
        run_id = client(uri).create_run(experiment_id, run_name="compare", tags={RUN_KEY_TAG: COMPARE_KEY}).info.run_id
    for path in paths:
        client(uri).log_artifact(run_id, str(path), "comparison")
    client(uri).set_terminated(run_id, "FINISHED")
    return paths


def compare_experiment(experiment: str, group_by: list[str] | None = None, tracking_uri: str = "",
                       out_dir: Path | None = None) -> pd.DataFrame:
    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri)
    frame = runs_frame(experiment, uri)
    table = compare_runs(frame, group_by or DEFAULT_GROUP_BY)
    with tempfile.TemporaryDirectory() as scratch:
        log_comparison(experiment, uri, frame, table, out_dir or Path(scratch))
    return table
