"""Tangent-rotation angle curvature from inner products alone (SPEC §3.3, kernel form).

Why: the curvature regularizer measures one small cloud per class (tens to hundreds of points in
64-512 dimensions) at every training step. Every quantity of the estimator depends on the points
only through inner products, so given each cloud's Gram matrix ``K = X Xᵀ`` all per-neighbour
work happens in (k+1)-dimensional patch coordinates and the ambient dimension p drops out. It is
the estimator of :func:`curvature.rotation.pointwise_curvature` (tested equal) in other
coordinates. With ``H`` the centring matrix of a patch ``P_i = {i} ∪ N(i)`` (m = k + 1 points):

    Y_i Y_iᵀ = H K[P_i, P_i] H = U_i Λ_i U_iᵀ,          T_i = W_iᵀ Y_i,  W_i = U_i[:, :d] Λ_i^{-1/2}
    T_j T_iᵀ = W_jᵀ (H K[P_j, P_i] H) W_i = M_ij,        R Rᵀ = diag(h_j) - M_ij M_ijᵀ

where ``R = T_j - (T_j T_iᵀ) T_i`` is the part of ``T_j`` outside ``T_i`` and ``h_j`` marks the
non-zero rows of ``T_j``; the eigenvalues of ``R Rᵀ`` are the sin² of the principal angles.
The Gram matrices are in float64: centring inside a Gram matrix subtracts nearly equal numbers,
and the (m x m) tensors here are small enough for double precision to cost little. One difference
from the points form remains: ``diag(h) - M Mᵀ`` is formed from cosines, so an angle near 0 is
resolved only to about sqrt(eps) of the caller's precision (3e-4 rad in float32, 1.5e-8 in
float64), where the points form resolves it fully; for the class curvatures CR works with (mean
angles of tenths of a radian and more) this is far below their own sampling noise.
"""

from __future__ import annotations

import torch

from curvature._linalg import safe_sqrt, squared_angle_from_sin2, symmetric_eigh, symmetric_eigvals
from curvature.local_pca import LocalSpectra, tangent_scales
from curvature.rotation import TangentDim, resolve_tangent_dim


def _gram_blocks(flat_gram: torch.Tensor, width: int, block: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """(E, m, m) entries ``K[rows, cols]`` of the block-diagonal Gram matrix (``rows``/``cols``
    are slots within ``block``)."""
    return flat_gram[(block[:, None, None] * width + rows[:, :, None]) * width + cols[:, None, :]]


def _centre(gram: torch.Tensor) -> torch.Tensor:
    """``H G H``: the Gram matrix of the same points after subtracting their mean."""
    return gram - gram.mean(dim=1, keepdim=True) - gram.mean(dim=2, keepdim=True) + gram.mean(dim=(1, 2), keepdim=True)


def _undirected_edges(indices: torch.Tensor, symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each neighbour pair once: the principal angles between ``T_i`` and ``T_j`` do not depend on
    the order when both have all d directions (``symmetric``), and most k-NN edges come in both
    directions. Returns the (own, other) rows of the distinct edges and, per directed edge
    (flattened ``indices``), which distinct edge it is."""
    n, k = indices.shape
    own = torch.arange(n, device=indices.device).repeat_interleave(k)
    other = indices.flatten()
    both = symmetric[own] & symmetric[other]
    low, high = torch.minimum(own, other), torch.maximum(own, other)
    keys = torch.where(both, low * n + high, n * n + own * n + other)  # asymmetric edges stay apart
    distinct, which = torch.unique(keys, return_inverse=True)
    first = torch.full_like(distinct, own.numel()).scatter_reduce(0, which, torch.arange(own.numel(), device=own.device),
                                                                  "amin")
    return own[first], other[first], which


def cloud_grams(clouds: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(B, W, W) float64 Gram matrices of the clouds (B, W, p), each first moved to the mean of its
    member points (a translation, which every patch's centring removes anyway) so that the
    entries are of the size of the cloud's spread, not of its distance from the origin."""
    width, dim = clouds.shape[1], clouds.shape[2]
    points = clouds.reshape(-1, dim).double()
    block = members // width
    sums = points.new_zeros(clouds.shape[0], dim).index_add_(0, block, points[members].detach())
    counts = torch.bincount(block, minlength=clouds.shape[0]).clamp_min(1)
    centred = points.reshape(clouds.shape) - (sums / counts[:, None])[:, None, :]
    return centred @ centred.mT


def gram_angle_curvature(clouds: torch.Tensor, members: torch.Tensor, indices: torch.Tensor,
                         tangent_dim: TangentDim) -> tuple[torch.Tensor, int]:
    """Per-point angle curvature ``a_i`` (radians) and the tangent dimension used.

    ``clouds`` (B, W, p): B clouds padded to W slots; ``members`` (n,): the flat slot
    (``cloud * W + slot``) of each measured point; ``indices`` (n, k): each point's neighbours as
    rows of ``members``, all in the point's own cloud. Differentiable with respect to ``clouds``;
    the final eigenvalues are taken in the clouds' precision.
    """
    width = clouds.shape[1]
    n, k = indices.shape
    flat_gram = cloud_grams(clouds, members).reshape(-1)
    block, slot = members // width, members % width
    patches = torch.cat([slot[:, None], slot[indices]], dim=1)  # (n, m) slots of {i} ∪ N(i)
    evals, evecs = symmetric_eigh(_centre(_gram_blocks(flat_gram, width, block, patches, patches)))
    spectra = LocalSpectra(evals.flip(-1), evecs.flip(-1), via_patch_gram=True)
    dim = resolve_tangent_dim(tangent_dim, spectra.evals, k, clouds.shape[-1])
    scales, has_direction = tangent_scales(spectra.evals, dim)  # Λ^{-1/2} where defined, else 0
    # T_i = W_iᵀ H X[P_i] = A_iᵀ X[P_i] with A_i = H W_i: the centring moves into the coefficients.
    coefficients = _centre_columns(spectra.evecs[..., :dim] * scales[:, None, :])  # (n, m, d)
    own, other, which = _undirected_edges(indices, has_direction.all(dim=1))
    cross = _gram_blocks(flat_gram, width, block[own], patches[other], patches[own])  # X[P_j] X[P_i]ᵀ
    overlap = coefficients[other].mT @ cross @ coefficients[own]  # (E, d, d): M_ij = T_j T_iᵀ
    residual_gram = torch.diag_embed(has_direction[other].to(overlap.dtype)) - overlap @ overlap.mT
    sin2 = symmetric_eigvals(residual_gram.to(clouds.dtype))
    theta = safe_sqrt(squared_angle_from_sin2(sin2).sum(dim=-1))
    return theta[which].reshape(n, k).mean(dim=1), dim


def _centre_columns(coefficients: torch.Tensor) -> torch.Tensor:
    """``H W``: each column minus its mean over the patch."""
    return coefficients - coefficients.mean(dim=1, keepdim=True)
