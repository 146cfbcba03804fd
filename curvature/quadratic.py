"""Second-fundamental-form curvature estimator, "quadratic" (SPEC §3.4).

Around each point, local PCA gives tangent coordinates ``u ∈ R^d`` of the neighbour offsets and
their normal residuals ``n ∈ R^p`` (orthogonal to the tangent space). A least-squares fit
``n ≈ 1/2 Σ_ab H_ab u_a u_b`` (plus a linear term that absorbs the tilt of the PCA tangent space)
gives the vector-valued second fundamental form ``H_ab ∈ R^p``. From it, with the Gauss equation:

* mean-curvature norm ``|Σ_a H_aa| / d``
* scalar curvature ``|Σ_a H_aa|² - Σ_ab |H_ab|²`` (= Σ_α [(tr H_α)² - |H_α|_F²])
* for d = 2 the Gaussian curvature ``<H_11, H_22> - |H_12|²`` (= det H for a hypersurface).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvature._inputs import ArrayLike, as_points, centred, check_k
from curvature.neighbours import Backend, knn_indices
from curvature._chunks import chunk_ranges
from curvature.local_pca import local_spectra, tangent_bases
from curvature.rotation import TangentDim, resolve_tangent_dim


@dataclass
class QuadraticCurvature:
    """Per-point curvatures of :func:`quadratic_curvature`."""

    mean: torch.Tensor  # (n,) mean-curvature norm, 1/length
    scalar: torch.Tensor  # (n,) scalar curvature, 1/length²
    gaussian: torch.Tensor | None  # (n,) for d == 2, else None
    tangent_dim: int


def _design(coords: torch.Tensor) -> torch.Tensor:
    """Regression columns: linear ``u_a``, then ``u_a²/2`` (a) and ``u_a u_b`` (a < b)."""
    d = coords.shape[-1]
    squares = [0.5 * coords[..., a] ** 2 for a in range(d)]
    cross = [coords[..., a] * coords[..., b] for a in range(d) for b in range(a + 1, d)]
    return torch.stack([coords[..., a] for a in range(d)] + squares + cross, dim=-1)


def _fit_second_fundamental_form(offsets: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """(c, d, d, p) ``H_ab`` from neighbour offsets (c, k, p) and tangent bases (c, d, p)."""
    d = bases.shape[1]
    coords = offsets @ bases.mT  # (c, k, d)
    normal = offsets - coords @ bases  # (c, k, p)
    radius = coords.detach().abs().amax(dim=(1, 2), keepdim=True)
    radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    design = _design(coords / radius)  # (c, k, q), well conditioned
    normal_eq = design.mT @ design
    # Coordinates are scaled to at most 1, so a ridge of 100·eps of the trace (plus 1e-12) only
    # matters for rank-deficient patches (duplicates, collinear points): their fit stays finite.
    trace = normal_eq.diagonal(dim1=-2, dim2=-1).sum(-1)
    ridge = (100 * torch.finfo(offsets.dtype).eps * trace + 1e-12)[:, None, None]
    eye = torch.eye(normal_eq.shape[-1], dtype=offsets.dtype, device=offsets.device)
    coef = torch.linalg.solve(normal_eq + ridge * eye, design.mT @ normal)  # (c, q, p)
    coef = coef[:, d:] / radius**2  # drop the linear tilt terms; undo the coordinate scaling
    hessian = offsets.new_zeros(offsets.shape[0], d, d, offsets.shape[-1])
    for a in range(d):
        hessian[:, a, a] = coef[:, a]
    pair = d
    for a in range(d):
        for b in range(a + 1, d):
            hessian[:, a, b] = coef[:, pair]
            hessian[:, b, a] = coef[:, pair]
            pair += 1
    return hessian


def quadratic_curvature(points: ArrayLike, k: int = 30, tangent_dim: TangentDim = "auto",
                        backend: Backend = "auto") -> QuadraticCurvature:
    """Per-point mean, scalar and (d = 2) Gaussian curvature from a local quadratic fit.

    Needs ``k >= d + d(d+1)/2 + 1`` neighbours (linear plus quadratic terms); differentiable with
    respect to ``points``.
    """
    tensor = centred(as_points(points))
    check_k(k, tensor.shape[0])
    indices = knn_indices(tensor, k, backend)
    spectra = local_spectra(tensor, indices)
    dim = resolve_tangent_dim(tangent_dim, spectra.evals, k, tensor.shape[1])
    needed = dim + dim * (dim + 1) // 2 + 1
    if k < needed:
        raise ValueError(f"k: the quadratic fit in {dim} dimensions needs k >= {needed}, got {k}")
    bases = tangent_bases(tensor, indices, spectra, dim)
    means, scalars, gaussians = [], [], []
    for rows in chunk_ranges(tensor.shape[0], k * tensor.shape[1] * (dim + 1)):
        offsets = tensor[indices[rows]] - tensor[rows, None, :]
        hessian = _fit_second_fundamental_form(offsets, bases[rows])
        trace = hessian.diagonal(dim1=1, dim2=2).sum(-1)  # (c, p) Σ_a H_aa
        trace_sq = trace.pow(2).sum(-1)
        means.append(trace_sq.clamp_min(0).add(1e-300 if tensor.dtype == torch.float64 else 1e-30).sqrt() / dim)
        scalars.append(trace_sq - hessian.pow(2).sum(dim=(1, 2, 3)))
        if dim == 2:
            gaussians.append((hessian[:, 0, 0] * hessian[:, 1, 1]).sum(-1) - hessian[:, 0, 1].pow(2).sum(-1))
    return QuadraticCurvature(mean=torch.cat(means), scalar=torch.cat(scalars),
                              gaussian=torch.cat(gaussians) if dim == 2 else None, tangent_dim=dim)
