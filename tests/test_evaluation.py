"""Per-epoch evaluation of a training run (issue: training, MLflow metrics): the per-class geometry
table at the configured tangent dimension, and the curvature metrics derived from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from curvature import manifolds
from orchestrator.evaluation import Predictions, correlation_metrics, geometry_table
from orchestrator.progress import ProgressLine


def test_training_runs_geometry_table_measures_at_the_configured_dimension(rng):
    """``eval.geometry_tangent_dim``: "auto" measures each class at its own dimension (3 for S³);
    an integer measures every class, train and test, at that one. Below S³'s dimension the angles
    come out larger: the top two directions of a patch of a 3-manifold are an arbitrary plane of
    its tangent space, and neighbouring patches pick different ones."""
    def cloud(n: int) -> Predictions:
        labels = torch.arange(2).repeat_interleave(n)
        points = torch.from_numpy(np.concatenate([manifolds.sphere(n, 3, 1.0, 8, rng) for _ in range(2)]))
        return Predictions(points.float(), labels, labels)

    train, test = cloud(800), cloud(400)
    tables = {dim: geometry_table(train, test, np.ones(2), np.array([800, 800]), 10, dim) for dim in ("auto", 2)}
    assert (tables["auto"][["train_tangent_dim", "test_tangent_dim"]] == 3).all().all()
    assert (tables[2][["train_tangent_dim", "test_tangent_dim"]] == 2).all().all()
    assert (tables[2]["train_mean_angle"] > 2 * tables["auto"]["train_mean_angle"]).all()


def test_training_runs_curvature_mean_and_imbalance_leave_skipped_classes_out():
    table = pd.DataFrame({"label": [0, 1, 2, 3], "mean_angle": [1.0, 2.0, 3.0, np.nan], "separation": [0.1] * 4,
                          "volume": [1.0] * 4, "skipped": ["", "", "", "fewer than k + 1 = 11 points"]})
    metrics = correlation_metrics(table, np.array([0.9, 0.8, 0.7, 0.5]), "geometry")
    assert metrics["geometry/curvature_mean"] == pytest.approx(2.0)
    assert metrics["geometry/curvature_imbalance"] == pytest.approx(np.std([1.0, 2.0, 3.0]) / 2.0)
    assert metrics["geometry/corr_acc_curvature"] == pytest.approx(-1.0)


def test_progress_lines_are_throttled_and_none_for_the_last_class(capsys, monkeypatch):
    clock = iter([0.0, 5.0, 11.0, 12.0, 25.0, 26.0, 30.0, 40.0])  # one reading at construction and per call
    monkeypatch.setattr("orchestrator.progress.time.perf_counter", lambda: next(clock))
    line = ProgressLine("geometry of the test features", every_s=10.0)
    for done in range(1, 6):
        line(done, 5)
    assert capsys.readouterr().err.splitlines() == ["[curvlt] geometry of the test features: 2/5 classes (11 s)",
                                                    "[curvlt] geometry of the test features: 4/5 classes (25 s)"]
    silent = ProgressLine("off", every_s=0.0)
    silent(1, 5)
    assert capsys.readouterr().err == ""
