"""Curvature as the rotation of tangent spaces between neighbours — the default estimator (SPEC §3.3).

For each point ``i`` and neighbour ``j``: principal angles ``θ_1..θ_d`` between the tangent spaces
``T_i`` and ``T_j``, Grassmann distance ``Θ_ij = sqrt(Σ θ_l²)``; angle curvature
``a_i = mean_j Θ_ij`` (radians, scale-free) and curvature ``κ_i = mean_j Θ_ij / |x_i - x_j|``
(1/length). On a round sphere of radius r, ``κ ≈ 1/r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from curvature._inputs import ArrayLike, as_points, centred, check_k
from curvature._linalg import safe_sqrt, squared_angle_from_sin2, symmetric_eigvals
from curvature.neighbours import Backend, gather_distances, knn_indices
from curvature._chunks import chunk_ranges
from curvature.local_pca import dim_from_spectra, local_spectra, tangent_bases

TangentDim = int | Literal["auto"]


def grassmann_distances(bases: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(n, k) Grassmann distances between each ``T_i`` and the tangent spaces of its neighbours.

    ``bases`` is (n, d, p) with orthonormal rows. The sines of the principal angles are the
    singular values of the residual ``R = T_j - (T_j T_iᵀ) T_i`` (the part of ``T_j`` outside
    ``T_i``), so ``sin²θ`` are the eigenvalues of ``R Rᵀ``: accurate for small angles, where ``acos``
    of a cosine near 1 is not.
    """
    n, d, p = bases.shape
    k = indices.shape[1]
    out = []
    for rows in chunk_ranges(n, k * p * d):
        own = bases[rows]  # (c, d, p)
        other = bases[indices[rows]].reshape(own.shape[0], k * d, p)  # (c, k*d, p)
        residual = other - (other @ own.mT) @ own  # (c, k*d, p)
        residual = residual.reshape(-1, k, d, p)
        sin2 = symmetric_eigvals(_row_gram(residual))  # (c, k, d)
        out.append(safe_sqrt(squared_angle_from_sin2(sin2).sum(dim=-1)))
    return torch.cat(out)


def _row_gram(rows: torch.Tensor) -> torch.Tensor:
    """``R Rᵀ`` over the last two axes (..., d, p) -> (..., d, d), as d(d+1)/2 contiguous dot
    products: for the small d of tangent spaces this beats a batched matmul of tiny matrices."""
    d = rows.shape[-2]
    if d > 3:
        return rows @ rows.mT
    gram = rows.new_empty(*rows.shape[:-2], d, d)
    for a in range(d):
        for b in range(a, d):
            dot = (rows[..., a, :] * rows[..., b, :]).sum(dim=-1)
            gram[..., a, b] = dot
            gram[..., b, a] = dot
    return gram


def pointwise_curvature(points: torch.Tensor, indices: torch.Tensor, dim: int,
                        spectra=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point angle curvature ``a_i`` and curvature ``κ_i`` for given neighbour lists.

    ``indices`` may come from any grouping (one cloud, or neighbours restricted to a class): the
    estimator itself never looks beyond a point's own neighbours, which is what lets the
    curvature regularizer treat all classes in one batch. Neighbours at distance zero (exact
    duplicates) have no defined rotation per length and are left out of ``κ_i``.
    """
    spectra = local_spectra(points, indices) if spectra is None else spectra
    bases = tangent_bases(points, indices, spectra, dim)
    theta = grassmann_distances(bases, indices)
    distances = gather_distances(points, indices)
    angle = theta.mean(dim=1)
    scale = distances.detach().amax().clamp_min(torch.finfo(points.dtype).tiny)
    separated = distances.detach() > scale * torch.finfo(points.dtype).eps
    per_length = torch.where(separated, theta / torch.where(separated, distances, torch.ones_like(distances)),
                             torch.zeros_like(theta))
    kappa = per_length.sum(dim=1) / separated.sum(dim=1).clamp_min(1)
    return angle, kappa


@dataclass
class TangentRotation:
    """Result of :func:`tangent_rotation`: per-point tensors and differentiable 0-d means."""

    angle: torch.Tensor  # (n,) radians
    kappa: torch.Tensor  # (n,) 1/length
    mean_angle: torch.Tensor
    mean_kappa: torch.Tensor
    median_angle: torch.Tensor
    median_kappa: torch.Tensor
    tangent_dim: int
    indices: torch.Tensor  # (n, k) neighbours used


def resolve_tangent_dim(tangent_dim: TangentDim, evals: torch.Tensor, k: int, p: int) -> int:
    """An explicit ``tangent_dim`` must satisfy ``1 <= d <= min(k, p)``; ``"auto"`` estimates it."""
    if tangent_dim == "auto":
        return dim_from_spectra(evals, k)
    if isinstance(tangent_dim, bool) or not isinstance(tangent_dim, int) or not 1 <= tangent_dim <= min(k, p):
        raise ValueError(f"tangent_dim: must be 'auto' or an integer in [1, {min(k, p)}] (min of k and p), "
                         f"got {tangent_dim!r}")
    return tangent_dim


def tangent_rotation(points: ArrayLike, k: int = 10, tangent_dim: TangentDim = "auto",
                     backend: Backend = "auto") -> TangentRotation:
    """Tangent-rotation curvature of one point cloud (SPEC §3.3).

    ``points``: (n, p) NumPy array or tensor (any device, float32/float64), n >= k + 1.
    Differentiable with respect to ``points``; neighbour indices are constants.
    """
    tensor = centred(as_points(points))
    check_k(k, tensor.shape[0])
    indices = knn_indices(tensor, k, backend)
    spectra = local_spectra(tensor, indices)
    dim = resolve_tangent_dim(tangent_dim, spectra.evals, k, tensor.shape[1])
    angle, kappa = pointwise_curvature(tensor, indices, dim, spectra)
    return TangentRotation(angle=angle, kappa=kappa, mean_angle=angle.mean(), mean_kappa=kappa.mean(),
                           median_angle=angle.median(), median_kappa=kappa.median(), tangent_dim=dim,
                           indices=indices)
