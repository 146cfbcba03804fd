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


def reference_separation(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """SPEC §3.2 as written: every volume recomputed from its points (slogdet, float64)."""
    p = points.shape[1]
    total = reference_volume(points, p)
    return np.array([(total - reference_volume(points[labels != c], p)) / reference_volume(points[labels == c], p)
                     for c in np.unique(labels)])


def clouds(rng, sizes, p, scales=None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes of the given sizes around random centres; ``scales`` stretch each class."""
    scales = scales or [1.0] * len(sizes)
    points = np.concatenate([(rng.normal(size=(m, p)) + rng.normal(size=p)) * s for m, s in zip(sizes, scales)])
    return points, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("sizes,p", [
    ([5, 5, 8, 30], 12),   # the determinant lemma (classes of 5, sharing one Cholesky factor), and a rest of 18 points
    ([6, 9, 7, 3], 12),    # rests of fewer than p points: measured from their points
    ([40, 50, 45], 3),     # classes larger than p: the downdated p x p scatter
])
def test_separation_matches_the_definition(sizes, p, rng):
    points, labels = clouds(rng, sizes, p)
    measured = separation(points, labels).separation.numpy()
    np.testing.assert_allclose(measured, reference_separation(points, labels), rtol=1e-9, atol=1e-12)


def test_separation_of_classes_at_very_different_scales(rng):
    """A class at 1e6 next to two at 1e-3: the rest of the large one is measured from its points,
    since downdating the scatter would leave eps·‖T‖ ≈ 1e-3 of error in a rest of trace 1e-4."""
    points, labels = clouds(rng, [40, 50, 30], 3, scales=[1e6, 1e-3, 1e-3])
    np.testing.assert_allclose(separation(points, labels).separation.numpy(), reference_separation(points, labels),
                               rtol=1e-7)


def test_separation_when_one_class_holds_a_direction_alone(rng):
    """The lemma's small matrix has an eigenvalue near 1/(1 + c·1e8) when only class 7 varies
    along the first axis, too close to its rounding error: that class's rest is measured by the
    downdated scatter instead."""
    p = 20
    lone = np.zeros((5, p))
    lone[:, 0] = rng.normal(size=5) * 1e4
    rest, rest_labels = clouds(rng, [60, 60], p, scales=[1e2, 1e2])
    rest[:, 0] = 0.0
    points, labels = np.concatenate([lone, rest]), np.concatenate([[7] * 5, rest_labels])
    np.testing.assert_allclose(separation(points, labels).separation.numpy(), reference_separation(points, labels),
                               rtol=1e-7)


def test_float32_separation_is_not_rounded_away(rng):
    """Overlapping classes in 64 dimensions have volumes of ~150 bits but differences of ~1e-4 bits,
    under float32's resolution at 150: the differences are taken in float64."""
    points, labels = clouds(rng, [200, 200, 200], 64, scales=[1.0, 1.0, 1.0])
    points = (points - points.mean(0)).astype(np.float32)  # one shared centre
    points[labels == 1] = rng.normal(size=(200, 64)).astype(np.float32)
    expected = reference_separation(points.astype(np.float64), labels)
    np.testing.assert_allclose(separation(points, labels).separation.numpy(), expected, rtol=1e-4)


def test_separation_gradient_flows_through_every_way_of_measuring(rng):
    points, labels = clouds(rng, [3, 3, 12], 6)  # the lemma for the two small classes, a downdate for the large one
    tensor = torch.tensor(points, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: separation(x, labels).separation, (tensor,))
