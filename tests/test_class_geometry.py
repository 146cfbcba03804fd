"""Per-class geometry table (SPEC §3, issue: geometry engine API)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from curvature import class_geometry, manifolds
from curvature.per_class import COLUMNS


def test_one_row_per_class_with_true_curvature(rng):
    radii = {3: 0.5, 7: 1.0, 9: 2.0}
    features = np.concatenate([manifolds.sphere(1500, 2, r, 12, rng) for r in radii.values()])
    labels = np.repeat(list(radii), 1500)
    table = class_geometry(features, labels, k=15)
    assert list(table.columns) == COLUMNS
    assert table["label"].tolist() == [3, 7, 9]
    assert (table["skipped"] == "").all() and (table["tangent_dim"] == 2).all()
    for _, row in table.iterrows():
        assert row["mean_kappa"] * radii[row["label"]] == pytest.approx(1.0, rel=0.05)
        assert row["mean_angle"] > 0 and row["volume"] > 0


def test_small_class_is_skipped_not_averaged(rng):
    features = np.concatenate([rng.normal(size=(100, 5)), rng.normal(size=(6, 5))])
    labels = np.repeat([0, 1], [100, 6])
    table = class_geometry(features, labels, k=10)
    small = table.set_index("label").loc[1]
    assert small["skipped"] == "fewer than k + 1 = 11 points"
    assert np.isnan(small["mean_kappa"]) and small["count"] == 6
    assert table.set_index("label").loc[0, "skipped"] == ""


def test_accepts_tensors_on_device(device, rng):
    features = torch.tensor(rng.normal(size=(300, 8)), device=device, dtype=torch.float32)
    labels = torch.tensor(np.repeat([0, 1, 2], 100), device=device)
    table = class_geometry(features, labels)
    assert len(table) == 3 and (table["skipped"] == "").all()


def test_label_shape_mismatch(rng):
    with pytest.raises(ValueError, match="labels"):
        class_geometry(rng.normal(size=(30, 3)), np.zeros(29, dtype=int))


def test_training_runs_geometry_table_measures_at_the_configured_dimension(rng):
    """``eval.geometry_tangent_dim``: "auto" measures each class at its own dimension (3 for S³);
    an integer measures every class, train and test, at that one. Below S³'s dimension the angles
    come out larger: the top two directions of a patch of a 3-manifold are an arbitrary plane of
    its tangent space, and neighbouring patches pick different ones."""
    from orchestrator.evaluation import Predictions, geometry_table

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
    from orchestrator.evaluation import correlation_metrics

    table = pd.DataFrame({"label": [0, 1, 2, 3], "mean_angle": [1.0, 2.0, 3.0, np.nan], "separation": [0.1] * 4,
                          "volume": [1.0] * 4, "skipped": ["", "", "", "fewer than k + 1 = 11 points"]})
    metrics = correlation_metrics(table, np.array([0.9, 0.8, 0.7, 0.5]), "geometry")
    assert metrics["geometry/curvature_mean"] == pytest.approx(2.0)
    assert metrics["geometry/curvature_imbalance"] == pytest.approx(np.std([1.0, 2.0, 3.0]) / 2.0)
    assert metrics["geometry/corr_acc_curvature"] == pytest.approx(-1.0)
