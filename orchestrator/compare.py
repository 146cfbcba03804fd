"""Comparison across runs (SPEC §8) of one MLflow experiment or several: runs grouped by
(dataset, loss, CR weight) by default, and a sweep's also by every other key it varies; mean ± std
over seeds, shot groups, mean curvature, curvature imbalance and the accuracy-curvature
correlation, and the gain over the same group without CR; as a table, CSV or JSON, and as plots
logged to MLflow."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.config import differing_keys  # noqa: E402
from orchestrator.errors import UserError  # noqa: E402
from orchestrator.tracking import (RUN_KEY_TAG, SWEPT_TAG, check_store_exists, client, experiment_names,  # noqa: E402
                                   experiment_runs, find_run, resolve_tracking_uri)

DEFAULT_GROUP_BY = ["dataset.name", "loss.name", "cr.weight"]
COLUMN_NAMES = {"dataset.name": "dataset", "loss.name": "loss", "cr.weight": "cr_weight"}
FINAL_METRICS = {"acc": "test/acc", "acc_many": "test/acc_many", "acc_medium": "test/acc_medium",
                 "acc_few": "test/acc_few", "curvature": "geometry/curvature_mean",
                 "curvature_imbalance": "geometry/curvature_imbalance",
                 "corr_acc_curvature": "geometry/corr_acc_curvature"}
COMPARE_KEY = "compare"
#: Characters of a comparison run's name that are kept (it lists the experiments compared).
MAX_RUN_NAME = 200
#: Experiment names an error about a missing experiment lists before "and N more".
SHOWN_NAMES = 10


def runs_frame(experiment: str, uri: str) -> pd.DataFrame:
    """One row per FINISHED training run: all params, the final headline metrics, and ``swept``:
    the keys its sweep varied ("" for a run outside a sweep)."""
    if client(uri).get_experiment_by_name(experiment) is None:
        names = experiment_names(uri)
        listed = ", ".join(names[:SHOWN_NAMES])
        if len(names) > SHOWN_NAMES:
            listed += f" and {len(names) - SHOWN_NAMES} more"
        raise UserError(f"--experiment: no MLflow experiment named {experiment!r} at {uri.split('@')[-1]}; "
                        + (f"experiments there: {listed}" if names else "it has none"))
    rows = []
    for run in experiment_runs(uri, experiment, "attributes.status = 'FINISHED'"):
        if run.data.tags.get(RUN_KEY_TAG, "").startswith(COMPARE_KEY):  # a comparison's own run
            continue
        row = {"run_id": run.info.run_id, **run.data.params, "swept": run.data.tags.get(SWEPT_TAG, "")}
        row.update({name: run.data.metrics.get(key, np.nan) for name, key in FINAL_METRICS.items()})
        rows.append(row)
    if not rows:
        raise UserError(f"--experiment: {experiment!r} has no finished runs yet")
    return pd.DataFrame(rows)


def sweep_group_by(swept: Iterable[str]) -> list[str]:
    """A sweep's comparison groups: the default keys and every key the sweep varies, except
    ``seed``, whose trials are the repeats that each group's mean and std are taken over."""
    return DEFAULT_GROUP_BY + [key for key in dict.fromkeys(swept) if key not in DEFAULT_GROUP_BY and key != "seed"]


def default_group_by(frame: pd.DataFrame) -> list[str]:
    """:func:`sweep_group_by` over every key that any of ``frame``'s sweeps varied and all its runs
    logged (a run of an older curvlt may lack a newer key), and over every key in which two runs of
    the same dataset differ, except those that do not change what a run computes
    (:func:`~orchestrator.config.differing_keys`). Runs that differ in anything but the seed are not
    repeats of one another, whether a sweep varied the key or they were started by hand: CE + CR
    at two tangent dimensions in one experiment would otherwise be averaged as two seeds."""
    swept = [key for keys in frame["swept"] for key in keys.split(",") if key]
    params = frame[[key for key in frame.columns if "." in key]]  # config keys; of those without a dot, seed
    logged = [{key: value for key, value in row.items() if not pd.isna(value)} for row in params.to_dict("records")]
    return [key for key in sweep_group_by([*swept, *differing_keys(logged)]) if key in frame]


def _numbers_where_possible(column: pd.Series) -> pd.Series:
    """A param column (MLflow logs strings) as numbers when every value is one, so that groups
    sort 2 < 10 and compare equal to their config values."""
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def compare_runs(frame: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """One row per group of ``frame``'s runs: their count, mean and std of top-1, shot groups, mean
    curvature, curvature imbalance and Pearson correlation of class accuracy with curvature (the
    paper's finding: negative where the more curved classes are the less accurate), and the gain
    in top-1 over the group that differs only in having ``cr.weight`` 0 (NaN where the runs have
    none)."""
    missing = [key for key in group_by if key not in frame]
    if missing:
        raise UserError(f"--group-by: {missing[0]!r} is not a logged param; try one of "
                        f"{', '.join(sorted(c for c in frame.columns if '.' in c)[:12])}, ...")
    frame = frame.assign(**{key: _numbers_where_possible(frame[key]) for key in group_by})
    grouped = frame.groupby(group_by, dropna=False)
    table = grouped.agg(n_runs=("run_id", "count"), acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                        acc_many_mean=("acc_many", "mean"), acc_medium_mean=("acc_medium", "mean"),
                        acc_few_mean=("acc_few", "mean"), curvature_mean=("curvature", "mean"),
                        curvature_imbalance_mean=("curvature_imbalance", "mean"),
                        corr_acc_curvature_mean=("corr_acc_curvature", "mean")).reset_index()
    table["acc_std"] = table["acc_std"].fillna(0.0)
    table["delta_acc_vs_no_cr"] = np.nan
    if "cr.weight" in group_by:
        others = [key for key in group_by if key != "cr.weight"]
        no_cr = table[table["cr.weight"] == 0.0]
        baseline = dict(zip(no_cr[others].itertuples(index=False, name=None), no_cr["acc_mean"]))
        table["delta_acc_vs_no_cr"] = [acc - baseline.get(key, np.nan) for acc, key in
                                       zip(table["acc_mean"], table[others].itertuples(index=False, name=None))]
    return table.rename(columns=COLUMN_NAMES).sort_values([COLUMN_NAMES.get(k, k) for k in group_by])


def render(table: pd.DataFrame, fmt: str) -> str:
    if fmt == "json":
        return table.to_json(orient="records", indent=2)
    if fmt == "csv":
        return table.to_csv(index=False)
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _label(keys: list[str], values: object) -> str:
    """A group's legend entry: the dataset and loss by name, every other key as ``key=value``."""
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(str(v) if key in ("dataset", "loss") else f"{key}={v}" for key, v in zip(keys, values))


def _legend_and_save(fig: plt.Figure, axes: Iterable[plt.Axes], path: Path) -> Path:
    """Each panel's legend below it, and the figure saved wide enough to hold them: labels that
    name several grouped keys are wider than a panel, and inside it they covered the curves."""
    for ax in axes:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_weight(table: pd.DataFrame, path: Path, series: list[str]) -> Path:
    """Top-1 against the CR weight, one panel per dataset, one line per value of the ``series``
    columns (the loss, and any other key the runs were grouped by)."""
    datasets = sorted(table["dataset"].unique()) if "dataset" in table else []
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.5 * max(1, len(datasets)), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        subset = table[table["dataset"] == dataset]
        for values, rows in subset.groupby(series):
            rows = rows.sort_values("cr_weight")
            ax.errorbar(rows["cr_weight"], 100 * rows["acc_mean"], yerr=100 * rows["acc_std"], marker="o",
                        capsize=3, label=_label(series, values))
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("CR weight λ")
        ax.set_ylabel("test top-1 (%)")
    return _legend_and_save(fig, axes[0], path)


def plot_correlations(frame: pd.DataFrame, uri: str, path: Path, group_by: list[str]) -> Path:
    """Mean Pearson r (class accuracy vs curvature) per epoch for each group of runs."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, rows in frame.groupby(group_by):
        curves = []
        for run_id in rows["run_id"]:
            history = client(uri).get_metric_history(run_id, "geometry/corr_acc_curvature")
            curves.append(pd.Series({m.step: m.value for m in history}, dtype=float))
        if curves and any(len(c) for c in curves):
            mean = pd.concat(curves, axis=1).mean(axis=1).sort_index()
            ax.plot(mean.index + 1, mean.values, marker="o",
                    label=_label([COLUMN_NAMES.get(key, key) for key in group_by], group))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Pearson r (accuracy, curvature)")
    return _legend_and_save(fig, [ax], path)


def log_comparison(experiments: list[str], uri: str, frame: pd.DataFrame, table: pd.DataFrame, group_by: list[str],
                   out_dir: Path) -> list[Path]:
    """Save the table and plots under ``out_dir`` and log them to the "compare" run of the first
    experiment: its own comparison, or one per list of experiments compared together (named after
    them, so that comparing the experiment alone does not overwrite it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "comparison.csv"]
    table.to_csv(paths[0], index=False)
    if {"dataset", "loss", "cr_weight"} <= set(table.columns):
        series = [COLUMN_NAMES.get(k, k) for k in group_by if k not in ("dataset.name", "cr.weight")]
        paths.append(plot_accuracy_vs_weight(table, out_dir / "accuracy_vs_weight.png", series))
    paths.append(plot_correlations(frame, uri, out_dir / "correlation_curves.png", group_by))
    key, name = COMPARE_KEY, "compare"
    if len(experiments) > 1:  # the names hashed: a run key goes into a search filter, names may hold quotes
        key += ":" + hashlib.sha1("\n".join(experiments).encode()).hexdigest()[:12]
        name = ("compare " + " + ".join(experiments))[:MAX_RUN_NAME]
    existing = find_run(uri, experiments[0], key)
    if existing is not None:
        run_id = existing.info.run_id
    else:
        experiment_id = client(uri).get_experiment_by_name(experiments[0]).experiment_id
        run_id = client(uri).create_run(experiment_id, run_name=name, tags={RUN_KEY_TAG: key}).info.run_id
    for path in paths:
        client(uri).log_artifact(run_id, str(path), "comparison")
    client(uri).set_terminated(run_id, "FINISHED")
    return paths


def compare_experiment(experiments: str | list[str], group_by: list[str] | None = None, tracking_uri: str = "",
                       out_dir: Path | None = None) -> pd.DataFrame:
    """The comparison of the finished runs of one experiment or of several together (e.g. one
    sweep per base loss): their runs are pooled and grouped as one experiment's would be, so runs of
    the same config in two experiments are repeats of one group."""
    experiments = [experiments] if isinstance(experiments, str) else list(dict.fromkeys(experiments))
    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri)
    frame = pd.concat([runs_frame(experiment, uri) for experiment in experiments], ignore_index=True)
    group_by = group_by or default_group_by(frame)
    table = compare_runs(frame, group_by)
    with tempfile.TemporaryDirectory() as scratch:
        log_comparison(experiments, uri, frame, table, group_by, out_dir or Path(scratch))
    return table
