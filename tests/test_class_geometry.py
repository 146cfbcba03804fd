"""Per-class geometry table (SPEC §3, issue: geometry engine API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvature import class_geometry, manifolds, tangent_rotation
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


def test_progress_is_reported_after_each_class(rng):
    features = np.concatenate([rng.normal(size=(40, 5)), rng.normal(size=(6, 5)), rng.normal(size=(30, 5))])
    calls = []
    class_geometry(features, np.repeat([4, 1, 2], [40, 6, 30]), k=10, progress=lambda *call: calls.append(call))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # the skipped class counts too


def test_classes_with_fewer_points_than_dimensions_are_measured_in_their_span(rng):
    """Such a class is measured in coordinates of its own span (an isometry; 8x faster for 50
    points in 2,048 dimensions): the same neighbours, dimension and curvature as in the ambient
    coordinates, to float32 rounding."""
    features = np.concatenate([manifolds.sphere(40, 2, r, 64, rng) for r in (0.5, 2.0)]).astype(np.float32)
    labels = np.repeat([0, 1], 40)
    table = class_geometry(features, labels, k=10).set_index("label")
    for label in (0, 1):
        direct = tangent_rotation(features[labels == label], k=10)
        assert table.loc[label, "tangent_dim"] == direct.tangent_dim == 2
        assert table.loc[label, "mean_angle"] == pytest.approx(float(direct.mean_angle), rel=1e-5)
        assert table.loc[label, "median_kappa"] == pytest.approx(float(direct.median_kappa), rel=1e-5)


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

