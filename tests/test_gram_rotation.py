"""The kernel form of the tangent-rotation estimator (used by CR) is the same estimator as the
points form (SPEC §3.3): equal values on clouds, padded batches of clouds and degenerate input."""

from __future__ import annotations

import pytest
import torch

from curvature import manifolds
from curvature.gram_rotation import (GramPatches, cloud_grams, gram_angles, gram_patches, inner_products_by_cloud,
                                     inner_products_by_point, neighbours_from_grams)
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


def test_inner_products_per_cloud_equal_those_per_point(rng, device):
    """``S_i = K[:, P_i] A_i`` as CUDA computes it (one product per cloud, coefficients placed at
    patch slots) and as the CPU does (one per point, on the patch rows): same values and gradients,
    for points in shuffled order, some slots not measured, and a patch holding one slot twice."""
    num_clouds, width, m, dim = 3, 7, 4, 2
    generator = torch.Generator().manual_seed(0)
    clouds = torch.tensor(rng.normal(size=(num_clouds, width, 5)), device=device)
    grams = cloud_grams(clouds, torch.ones(num_clouds, width, dtype=torch.bool, device=device)).detach()
    members = torch.randperm(num_clouds * width, generator=generator)[:15].to(device)  # 15 of 21 slots
    others = torch.stack([torch.randperm(width, generator=generator)[: m - 1] for _ in range(15)]).to(device)
    patches = torch.cat([(members % width)[:, None], others], dim=1)
    patches[0, 2] = patches[0, 1]  # a slot twice
    coefficients = torch.randn(15, m, dim, generator=generator, dtype=torch.float64).to(device)
    upstream = torch.randn(15, width, dim, generator=generator, dtype=torch.float64).to(device)
    results = []
    for form in (inner_products_by_cloud, inner_products_by_point):
        leaves = grams.clone().requires_grad_(), coefficients.clone().requires_grad_()
        evals = torch.zeros(15, m, dtype=torch.float64, device=device)  # not read by either form
        spectra = GramPatches(leaves[0], members // width, patches, evals, evals[..., None].expand(15, m, m))
        inner = form(spectra, leaves[1])
        (inner * upstream).sum().backward()
        results.append((inner, *(leaf.grad for leaf in leaves)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


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
