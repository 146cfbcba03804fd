"""Second-fundamental-form estimator against known answers (SPEC §3.4)."""

from __future__ import annotations

import pytest
import torch

from curvature import manifolds, quadratic_curvature

R = 2.0


@pytest.mark.parametrize("ambient", [3, 10])
def test_sphere(ambient, rng):
    result = quadratic_curvature(manifolds.sphere(4000, 2, R, ambient, rng), k=30)
    assert result.tangent_dim == 2
    assert float(result.gaussian.mean()) == pytest.approx(1 / R**2, rel=0.05)
    assert float(result.mean.mean()) == pytest.approx(1 / R, rel=0.05)


@pytest.mark.parametrize("ambient", [3, 10])
def test_cylinder(ambient, rng):
    result = quadratic_curvature(manifolds.cylinder(4000, R, 8.0, ambient, rng), k=30)
    assert abs(float(result.gaussian.mean())) < 0.05 / R**2
    assert float(result.mean.mean()) == pytest.approx(1 / (2 * R), rel=0.05)


@pytest.mark.parametrize("ambient", [3, 10])
def test_saddle_at_origin(ambient, rng):
    result = quadratic_curvature(manifolds.saddle(4000, 1.0, ambient, rng), k=30)
    assert float(result.gaussian[0]) == pytest.approx(-1.0, rel=0.05)
    assert abs(float(result.mean[0])) < 0.05


def test_scalar_curvature_of_s3(rng):
    result = quadratic_curvature(manifolds.sphere(10000, 3, R, 6, rng), k=20)
    assert result.tangent_dim == 3
    assert result.gaussian is None
    assert float(result.scalar.mean()) == pytest.approx(6 / R**2, rel=0.05)


def test_too_few_neighbours_for_the_fit(rng):
    with pytest.raises(ValueError, match="k >= 10"):
        quadratic_curvature(manifolds.sphere(200, 3, 1.0, 5, rng), k=8, tangent_dim=3)


def test_gradcheck_float64(rng):
    points = torch.tensor(manifolds.sphere(40, 2, 1.0, 3, rng), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: quadratic_curvature(x, k=12, tangent_dim=2).gaussian.mean(), (points,))


def test_runs_on_device(device, rng):
    points = torch.tensor(manifolds.sphere(4000, 2, R, 3, rng), dtype=torch.float32, device=device)
    result = quadratic_curvature(points, k=30)
    assert float(result.gaussian.mean()) == pytest.approx(1 / R**2, rel=0.05)
