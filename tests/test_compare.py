"""Grouping and baselines of the comparison table (issue: sweeps, ``curvlt compare``), on run
frames built here; the end-to-end path through a real sweep and MLflow is in test_sweep.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from orchestrator.compare import (DEFAULT_GROUP_BY, _label, compare_runs, default_group_by, plot_accuracy_vs_weight,
                                  sweep_group_by)


def runs(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """Runs as ``runs_frame`` gives them: params as MLflow's strings, metrics as numbers."""
    return pd.DataFrame([{"run_id": str(i), "swept": "cr.balance_weight,seed", "dataset.name": "d", "loss.name": "ce",
                          "cr.weight": weight, "cr.balance_weight": beta, "seed": seed, "acc": acc, "acc_many": acc,
                          "acc_medium": acc, "acc_few": acc, "curvature": 1.0, "curvature_imbalance": 0.1,
                          "corr_acc_curvature": acc - 1.0}
                         for i, (weight, beta, seed, acc) in enumerate(rows)])


def test_a_sweep_groups_by_what_it_varies_except_the_seed():
    assert sweep_group_by({"cr.weight": {}, "seed": {}}) == DEFAULT_GROUP_BY
    assert sweep_group_by({"cr.balance_weight": {}, "seed": {}, "loss.name": {}}) == [*DEFAULT_GROUP_BY,
                                                                                      "cr.balance_weight"]
    frame = runs([("0.5", "1.0", "0", 0.8)])
    assert default_group_by(frame) == [*DEFAULT_GROUP_BY, "cr.balance_weight"]  # from the runs' tags
    frame["swept"] = ["cr.weight,train.new_key"]  # a key these runs did not log: not grouped by
    assert default_group_by(frame) == DEFAULT_GROUP_BY


def test_runs_started_by_hand_are_grouped_by_what_they_differ_in():
    frame = runs([("0.0", "1.0", "0", 0.80), ("0.5", "1.0", "1", 0.82), ("0.5", "1.0", "2", 0.85)])
    frame["swept"] = ""
    frame["cr.tangent_dim"] = ["auto", "auto", "2"]
    frame["mlflow.run_name"] = ["ce", "cr", "cr-d2"]  # what does not change the computation is not grouped by
    frame["checkpoint.every"] = ["1", "2", "1"]
    assert default_group_by(frame) == [*DEFAULT_GROUP_BY, "cr.tangent_dim"]
    other = runs([("0.5", "1.0", "0", 0.7)]).assign(**{"dataset.name": "e", "cr.tangent_dim": "4", "swept": ""})
    both = pd.concat([frame.iloc[:2], other])  # same key, different datasets: told apart by the dataset
    assert default_group_by(both) == DEFAULT_GROUP_BY


def test_the_gain_is_over_the_group_that_differs_only_in_having_no_cr():
    frame = runs([("0.0", "1.0", "0", 0.80), ("0.0", "1.0", "1", 0.82), ("0.5", "1.0", "0", 0.85),
                  ("0.0", "4.0", "0", 0.70), ("0.5", "4.0", "0", 0.76), ("0.5", "10.0", "0", 0.90)])
    table = compare_runs(frame, [*DEFAULT_GROUP_BY, "cr.balance_weight"]).set_index(["cr_weight", "cr.balance_weight"])
    assert table.loc[(0.0, 1.0), "n_runs"] == 2 and table.loc[(0.0, 1.0), "delta_acc_vs_no_cr"] == pytest.approx(0.0)
    assert table.loc[(0.5, 1.0), "delta_acc_vs_no_cr"] == pytest.approx(0.04)
    assert table.loc[(0.0, 1.0), "corr_acc_curvature_mean"] == pytest.approx(-0.19)  # mean of -0.20 and -0.18
    assert table.loc[(0.5, 4.0), "delta_acc_vs_no_cr"] == pytest.approx(0.06)
    assert np.isnan(table.loc[(0.5, 10.0), "delta_acc_vs_no_cr"])  # no run without CR at this balance weight
    assert table.loc[0.5].index.tolist() == [1.0, 4.0, 10.0]  # params compared as numbers: 4 sorts before 10


def test_accuracy_plot_draws_a_line_per_loss_and_other_grouped_key(tmp_path):
    frame = runs([("0.0", "1.0", "0", 0.80), ("0.5", "1.0", "0", 0.85), ("0.0", "4.0", "0", 0.70),
                  ("0.5", "4.0", "0", 0.76)])
    table = compare_runs(frame, [*DEFAULT_GROUP_BY, "cr.balance_weight"])
    path = plot_accuracy_vs_weight(table, tmp_path / "plot.png", ["loss", "cr.balance_weight"])
    assert path.stat().st_size > 0


def test_legend_entries_name_every_grouped_key_but_dataset_and_loss():
    assert _label(["dataset", "loss", "cr_weight", "train.epochs"], ("digits_lt", "ce", 0.5, 30)) == \
        "digits_lt, ce, cr_weight=0.5, train.epochs=30"
