"""Volume and separation degree (SPEC §3.1, §3.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curvature import separation, volume


def reference_volume(points: np.ndarray, scale: float) -> float:
    centred = points - points.mean(0)
    m, p = points.shape
    sign, logdet = np.linalg.slogdet(np.eye(p) + scale / m * centred.T @ centred)
    assert sign > 0
    return 0.5 * logdet / math.log(2)


@pytest.mark.parametrize("m,p", [(200, 5), (30, 50)])
def test_matches_slogdet(m, p, rng):
    points = rng.normal(size=(m, p)) * rng.uniform(0.1, 3, size=p)
    assert float(volume(points)) == pytest.approx(reference_volume(points, p), rel=1e-9)
    assert float(volume(points, scale=2.0)) == pytest.approx(reference_volume(points, 2.0), rel=1e-9)


def test_large_dimension_does_not_overflow(rng):
    points = rng.normal(size=(1000, 512)).astype(np.float32) * 100
    value = float(volume(points))
    assert math.isfinite(value) and value > 0


def test_single_point_and_constant_cloud_have_zero_volume():
    assert float(volume(np.ones((1, 4)))) == 0.0
    assert float(volume(np.ones((10, 4)))) == 0.0


def test_bad_scale(rng):
    with pytest.raises(ValueError, match="scale"):
        volume(rng.normal(size=(10, 3)), scale=-1.0)


def test_separated_classes_add_more_volume(rng):
    close = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 0.1])
    far = np.concatenate([rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 20.0])
    labels = np.repeat([0, 1], 300)
    assert float(separation(far, labels).separation[1]) > float(separation(close, labels).separation[1]) + 0.5


def test_zero_volume_class_is_skipped_with_reason(rng):
    features = np.concatenate([rng.normal(size=(50, 3)), np.zeros((20, 3))])
    labels = np.repeat([4, 9], [50, 20])
    result = separation(features, labels)
    assert result.labels.tolist() == [4, 9]
    assert result.skipped[0] == "" and "too small" in result.skipped[1]
    assert torch.isfinite(result.separation).all()


def test_gradient_flows(rng):
    points = torch.tensor(rng.normal(size=(20, 6)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: volume(x), (points,))
