"""Tangent-rotation curvature against manifolds of known curvature (SPEC §3.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvature import intrinsic_dim, manifolds, tangent_rotation

RADIUS = 2.0


@pytest.mark.parametrize("n", [2000, 5000])
@pytest.mark.parametrize("ambient", [None, 16, 128])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sphere_curvature_is_one_over_radius(dim, ambient, n, rng):
    points = manifolds.sphere(n, dim, RADIUS, ambient or dim + 1, rng).astype(np.float32)
    result = tangent_rotation(points, k=20)
    assert result.tangent_dim == dim
    assert float(result.mean_kappa) * RADIUS == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_auto_recovers_dimension_at_default_k(dim, rng):
    points = manifolds.sphere(3000, dim, 1.0, 64, rng)
    assert intrinsic_dim(points) == dim
    assert tangent_rotation(points).tangent_dim == dim


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_flat_patch_has_no_curvature(dim, rng):
    # Same sampling density as 2,000 points on the unit sphere S^dim.
    unit_sphere_area = {1: 2 * np.pi, 2: 4 * np.pi, 3: 2 * np.pi**2}[dim]
    half_side = unit_sphere_area ** (1 / dim) / 2
    points = manifolds.plane(2000, dim, 32, rng, extent=half_side).astype(np.float32)
    result = tangent_rotation(points, k=20)
    assert result.tangent_dim == dim
    assert float(result.mean_kappa) < 1e-3


def test_auto_dimension_is_the_lower_median_of_explained_counts():
    """The auto dimension comes from a histogram (so that CR can sum it over classes measured at
    different steps); it must be the lower median of the per-patch counts, duplicates left out."""
    from curvature.local_pca import EXPLAINED_VARIANCE, dim_from_spectra

    generator = torch.Generator().manual_seed(5)
    for _ in range(300):
        n, r = int(torch.randint(1, 30, (), generator=generator)), int(torch.randint(1, 12, (), generator=generator))
        k = int(torch.randint(2, 14, (), generator=generator))
        evals = torch.rand(n, r, generator=generator).pow(float(torch.randint(1, 8, (), generator=generator)))
        evals = evals.sort(dim=1, descending=True).values
        evals[torch.rand(n, generator=generator) < 0.2] = 0  # patches of identical points
        informative = evals.sum(dim=1) > 0
        shares = evals[informative].cumsum(dim=1) / evals[informative].sum(dim=1, keepdim=True)
        counts = (shares < EXPLAINED_VARIANCE).sum(dim=1) + 1
        expected = int(counts.median()) if counts.numel() else 1  # torch.median: the lower middle value
        assert dim_from_spectra(evals, k) == min(max(expected, 1), max(1, min(k - 2, r)))


def test_rotation_and_translation_change_nothing(rng):
    points = manifolds.sphere(1500, 2, 1.5, 10, rng)
    moved = points @ manifolds.random_rotation(10, rng) + rng.normal(size=10) * 5
    a, b = tangent_rotation(points, k=15), tangent_rotation(moved, k=15)
    assert float(b.mean_kappa) == pytest.approx(float(a.mean_kappa), rel=1e-6)
    assert float(b.mean_angle) == pytest.approx(float(a.mean_angle), rel=1e-6)


@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e4])
def test_scaling_divides_kappa_and_keeps_angle(factor, rng):
    points = manifolds.sphere(1500, 2, 1.0, 10, rng)
    a, b = tangent_rotation(points, k=15), tangent_rotation(points * factor, k=15)
    assert float(b.mean_kappa) * factor == pytest.approx(float(a.mean_kappa), rel=1e-6)
    assert float(b.mean_angle) == pytest.approx(float(a.mean_angle), rel=1e-6)


def test_float32_agrees_with_float64(rng):
    points = manifolds.sphere(2000, 2, 1.0, 32, rng)
    a = tangent_rotation(points.astype(np.float64), k=15)
    b = tangent_rotation(points.astype(np.float32), k=15)
    assert float(b.mean_kappa) == pytest.approx(float(a.mean_kappa), rel=1e-4)


@pytest.mark.parametrize("offset", [30.0, 100.0])
def test_float32_far_from_the_origin_agrees_with_float64(offset, rng):
    """A small sphere (r = 0.3) whose centre is 240 or 800 from the origin, as ReLU features sit:
    measured in float32 as it was, the mean angle came out 0.320 rad (offset 30) and 1e-4 with
    d = 3 (offset 100) against 0.215 with d = 2 in float64. Points are centred (in float64) first."""
    points = (manifolds.sphere(400, 2, 0.3, 64, rng) + offset * rng.uniform(0.5, 1.5, 64)).astype(np.float32)
    single, double = tangent_rotation(points, k=10), tangent_rotation(points.astype(np.float64), k=10)
    assert single.tangent_dim == double.tangent_dim == 2
    assert float(single.mean_angle) == pytest.approx(float(double.mean_angle), rel=1e-5)
    assert intrinsic_dim(points, k=10) == 2


def test_small_angles_are_not_floored(rng):
    """A densely sampled circle: neighbour angles of ~1e-3 rad must not be inflated by an acos
    clamp (which would floor every angle near 3.5e-4 rad in float32)."""
    points = manifolds.sphere(20000, 1, 1.0, 8, rng).astype(np.float32)
    result = tangent_rotation(points, k=10)
    assert float(result.mean_kappa) == pytest.approx(1.0, rel=0.05)


def test_explicit_tangent_dim_and_bad_values(rng):
    points = manifolds.sphere(500, 2, 1.0, 5, rng)
    assert tangent_rotation(points, k=10, tangent_dim=2).tangent_dim == 2
    for bad in (0, 11, 2.5, "two", True):
        with pytest.raises(ValueError, match="tangent_dim"):
            tangent_rotation(points, k=10, tangent_dim=bad)


def test_overestimated_dimension_hides_curvature(rng):
    """Why ``auto`` matters: S^2 seen with d = 3 looks almost flat."""
    points = manifolds.sphere(3000, 2, 1.0, 3, rng)
    assert float(tangent_rotation(points, k=15, tangent_dim=3).mean_kappa) < 0.05


def test_gradcheck_float64(rng):
    points = torch.tensor(manifolds.sphere(30, 2, 1.0, 4, rng) + 0.05 * rng.normal(size=(30, 4)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tangent_rotation(x, k=7, tangent_dim=2).mean_kappa, (points,))
    assert torch.autograd.gradcheck(lambda x: tangent_rotation(x, k=7, tangent_dim=2).mean_angle, (points,))
    wide = torch.tensor(rng.normal(size=(25, 12)), requires_grad=True)  # p > k + 1: patch-Gram path
    assert torch.autograd.gradcheck(lambda x: tangent_rotation(x, k=6, tangent_dim=3).mean_kappa, (wide,))


def test_runs_on_device(device, rng):
    points = torch.tensor(manifolds.sphere(2000, 2, RADIUS, 16, rng), dtype=torch.float32, device=device)
    result = tangent_rotation(points, k=20)
    assert result.kappa.device.type == device
    assert float(result.mean_kappa) * RADIUS == pytest.approx(1.0, rel=0.05)
