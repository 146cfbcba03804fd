"""The kernel form of the tangent-rotation estimator (used by CR) is the same estimator as the
points form (SPEC §3.3): equal values on clouds, padded batches of clouds and degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvature import manifolds
from curvature.gram_rotation import cloud_grams, gram_angles, gram_patches, neighbours_from_grams
from curvature.local_pca import local_spectra
from curvature.neighbours import knn_indices
from curvature.rotation import pointwise_curvature, resolve_tangent_dim


def points_form(points: torch.Tensor, indices: torch.Tensor, tangent_dim="auto") -> tuple[torch.Tensor, int]:
    spectra = local_spectra(points, indices)
    dim = resolve_tangent_dim(tangent_dim, spectra.evals, indices.shape[1], points.shape[1])
    return pointwise_curvature(points, indices, dim, spectra)[0], dim


def kernel_form(clouds: torch.Tensor, members: torch.Tensor, indices: torch.Tensor, tangent_dim,
                angle_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    valid = torch.zeros(clouds.shape[0] * clouds.shape[1], dtype=torch.bool, device=clouds.device)
    valid = valid.index_fill(0, members, True).reshape(clouds.shape[:2])
    patches = gram_patches(cloud_grams(clouds, valid), members, indices)
    dim = resolve_tangent_dim(tangent_dim, patches.evals, indices.shape[1], clouds.shape[2])
    return gram_angles(patches, indices, dim, angle_dtype), dim


def clouds(rng) -> list[torch.Tensor]:
    random = torch.tensor(rng.normal(size=(120, 30)))
    sphere = torch.tensor(manifolds.sphere(150, 2, 3.0, 12, rng)) + 5.0  # far from the origin
    duplicated = torch.tensor(rng.normal(size=(60, 8)))
    duplicated[:7] = duplicated[0]  # patches with fewer distinct points than directions
    return [random, sphere, duplicated]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_equals_the_points_form(which, rng):
    points = clouds(rng)[which]
    indices = knn_indices(points, 8, "torch")
    expected, dim = points_form(points, indices)
    angle, gram_dim = kernel_form(points[None], torch.arange(len(points)), indices, "auto")
    assert gram_dim == dim
    torch.testing.assert_close(angle, expected, rtol=1e-6, atol=1e-7)


def test_float32_keeps_small_angles(rng):
    """Gram matrices are formed in float64 after centring each cloud, so a float32 cloud far from
    the origin still gives the float64 answer to float32 precision."""
    points = torch.tensor(manifolds.sphere(400, 2, 3.0, 20, rng)) + 5.0
    indices = knn_indices(points, 10, "torch")
    expected, _ = points_form(points, indices, 2)
    angle, _ = kernel_form(points.float()[None], torch.arange(400), indices, 2, torch.float32)
    assert float((angle.double() - expected).abs().max()) < 1e-6


def test_padded_batch_of_clouds_equals_each_cloud_alone(rng, device):
    """Several clouds of different sizes in one padded tensor, with junk in the padding."""
    sizes, width, dim = [40, 25, 33], 45, 6
    batch = torch.tensor(rng.normal(size=(3, width, dim)), device=device)
    members, neighbours, expected = [], [], []
    for c, size in enumerate(sizes):
        points = batch[c, :size]
        indices = knn_indices(points, 6, "torch")
        neighbours.append(indices + sum(sizes[:c]))
        members.append(torch.arange(size, device=device) + c * width)
        expected.append(points_form(points, indices, 3)[0])
    angle, _ = kernel_form(batch, torch.cat(members), torch.cat(neighbours), 3)
    torch.testing.assert_close(angle, torch.cat(expected), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dim", [2, 3])  # pair eigenvalues in closed form (2) or from eigh (3)
def test_same_jacobian_as_the_points_form(dim, rng):
    """The points form is gradchecked (test_tangent_rotation); the kernel form must have the same
    Jacobian. (A direct gradcheck would trip on neighbours with identical patches, whose angles
    are exactly 0 and which the kernel form resolves only to sqrt(eps), see the module doc.)"""
    from torch.autograd.functional import jacobian

    points = torch.tensor(rng.normal(size=(30, 8)))
    indices = knn_indices(points, 5, "torch")
    expected = jacobian(lambda x: points_form(x, indices, dim)[0], points)
    actual = jacobian(lambda x: kernel_form(x[None], torch.arange(30), indices, dim)[0], points)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_neighbours_from_grams_are_the_exact_neighbours(rng):
    """CR ranks neighbours by distances read off the Gram matrices; padding is never a neighbour."""
    sizes, width = [40, 25, 33], 45
    batch = torch.tensor(rng.normal(size=(3, width, 12))) + 7.0  # far from the origin
    valid = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    found = neighbours_from_grams(cloud_grams(batch, valid), valid, 5)
    for c, size in enumerate(sizes):
        expected = knn_indices(batch[c, :size], 5, "torch")
        assert torch.equal(found[c, :size].sort(dim=1).values, expected.sort(dim=1).values)
