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


def test_several_experiments_are_compared_together(tmp_path):
    """One sweep per base loss, each its own experiment: their runs in one table, the same config
    in two experiments counted as repeats of one group, and the comparison logged to the first
    experiment under its own key, apart from that experiment's own comparison."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import build_parser
    from orchestrator.compare import COMPARE_KEY, compare_experiment
    from orchestrator.tracking import RUN_KEY_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(uri)
    for experiment, loss, weight, seed, acc in (("ce", "ce", "0.0", "0", 0.80), ("ce", "ce", "0.5", "0", 0.82),
                                                ("bsm", "balanced_softmax", "0.0", "0", 0.86),
                                                ("bsm", "balanced_softmax", "0.5", "0", 0.88),
                                                ("bsm", "ce", "0.0", "1", 0.84)):  # a CE run in the other one
        found = store.get_experiment_by_name(experiment)
        run = store.create_run(found.experiment_id if found else store.create_experiment(experiment))
        for key, value in (("dataset.name", "d"), ("loss.name", loss), ("cr.weight", weight), ("seed", seed)):
            store.log_param(run.info.run_id, key, value)
        store.log_metric(run.info.run_id, "test/acc", acc)
        store.set_terminated(run.info.run_id, "FINISHED")
    args = build_parser().parse_args(["compare", "--experiment", "ce", "bsm", "--format", "json"])
    assert args.experiment == ["ce", "bsm"]
    for _ in range(2):  # the second time, the comparison's own run is not counted as a run
        table = compare_experiment(args.experiment, tracking_uri=uri, out_dir=tmp_path / "out").set_index(
            ["loss", "cr_weight"])
        assert table["n_runs"].to_dict() == {("balanced_softmax", 0.0): 1, ("balanced_softmax", 0.5): 1,
                                             ("ce", 0.0): 2, ("ce", 0.5): 1}
        assert table.loc[("ce", 0.0), "acc_mean"] == pytest.approx(0.82)
        assert table.loc[("balanced_softmax", 0.5), "delta_acc_vs_no_cr"] == pytest.approx(0.02)
    compare_experiment("ce", tracking_uri=uri)
    keys = sorted(run.data.tags[RUN_KEY_TAG] for run in store.search_runs([store.get_experiment_by_name("ce")
                                                                           .experiment_id])
                  if RUN_KEY_TAG in run.data.tags)
    assert len(keys) == 2 and keys[0] == COMPARE_KEY and keys[1].startswith(COMPARE_KEY + ":")
    assert (tmp_path / "out" / "comparison.csv").is_file()
