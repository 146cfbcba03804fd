"""Local PCA of k-nearest-neighbour patches: spectra, intrinsic dimension, tangent spaces (SPEC §3.3).

Every point's patch is ``{x_i} ∪ N(i)`` (m = k + 1 points), centred. Its top-``d`` right singular
vectors span the tangent space ``T_i``. They come from the eigen-decomposition of whichever of the
two Gram matrices is smaller: ``Y Yᵀ`` (m x m, the usual case p > m) or ``Yᵀ Y`` (p x p).
Patches are processed in chunks so memory stays bounded for large clouds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvature._chunks import chunk_ranges
from curvature._linalg import symmetric_eigh

#: Share of local variance the tangent space must explain for ``tangent_dim="auto"``.
EXPLAINED_VARIANCE = 0.95


def centred_patches(points: torch.Tensor, indices: torch.Tensor, rows: slice) -> torch.Tensor:
    """(len(rows), k+1, p) patches ``{x_i} ∪ N(i)`` minus their mean, divided by a detached
    per-patch scale so that clouds at 1e-12 or 1e8 neither under- nor overflow in the Gram
    matrices (the tangent space is scale-free, so no gradient is lost)."""
    patch = torch.cat([points[rows, None, :], points[indices[rows]]], dim=1)
    patch = patch - patch.mean(dim=1, keepdim=True)
    scale = patch.detach().abs().amax(dim=(1, 2), keepdim=True)
    return patch / torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass
class LocalSpectra:
    """Per-point patch eigenvalues (descending) and eigenvectors of the smaller Gram matrix."""

    evals: torch.Tensor  # (n, r), r = min(m, p)
    evecs: torch.Tensor  # (n, m, m) when via_patch_gram else (n, p, p); columns descending
    via_patch_gram: bool


def local_spectra(points: torch.Tensor, indices: torch.Tensor) -> LocalSpectra:
    """Eigen-decompose every point's centred patch, chunk by chunk."""
    n, p = points.shape
    m = indices.shape[1] + 1
    via_patch_gram = p > m
    evals, evecs = [], []
    for rows in chunk_ranges(n, m * p):
        patch = centred_patches(points, indices, rows)
        gram = patch @ patch.mT if via_patch_gram else patch.mT @ patch
        chunk_evals, chunk_evecs = symmetric_eigh(gram)
        evals.append(chunk_evals.flip(-1))
        evecs.append(chunk_evecs.flip(-1))
    return LocalSpectra(torch.cat(evals), torch.cat(evecs), via_patch_gram)


def dim_from_spectra(evals: torch.Tensor, k: int, threshold: float = EXPLAINED_VARIANCE) -> int:
    """Intrinsic dimension: the median over points of the fewest principal directions explaining
    ``threshold`` of the patch variance, clipped to ``[1, k - 2]`` (SPEC §3.3). Patches with no
    variance (duplicates) carry no information and are left out of the median."""
    one_group = torch.zeros(evals.shape[0], dtype=torch.long, device=evals.device)
    return dim_from_histogram(explained_count_histograms(evals, one_group, 1, threshold)[0], k)


def explained_count_histograms(evals: torch.Tensor, groups: torch.Tensor, num_groups: int,
                               threshold: float = EXPLAINED_VARIANCE) -> torch.Tensor:
    """(num_groups, r + 1): per group of patches (``groups`` (n,) of descending ``evals`` (n, r)),
    how many of its patches with any variance need c principal directions to explain ``threshold``
    of it (c = 1..r)."""
    evals = evals.detach().clamp_min(0)
    total = evals.sum(dim=1)
    explained = evals.cumsum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    counts = (explained < threshold).sum(dim=1) + 1
    bins = evals.shape[1] + 1
    # patches without variance go to one extra bin, dropped: no selection, so no host read
    flat = torch.where(total > 0, groups * bins + counts, num_groups * bins)
    histogram = flat.new_zeros(num_groups * bins + 1).index_add_(0, flat, torch.ones_like(flat))
    return histogram[:-1].reshape(num_groups, bins)


def dim_from_histogram(histogram: torch.Tensor, k: int) -> int:
    """:func:`dim_from_spectra` from the histogram of the informative patches' explained counts
    (``histogram[c]``: how many patches need c directions; length r + 1). A histogram can be summed
    over point sets, which lets the curvature regularizer combine classes measured at different
    steps. The median is the lower one of an even count, as ``torch.median``'s; with no patch, 1.
    Found on the histogram's device and read back once (the only host read of the "auto" dimension)."""
    upper = max(1, min(k - 2, histogram.shape[0] - 1))
    total = histogram.sum()
    median = torch.searchsorted(histogram.cumsum(0), (total - 1).div(2, rounding_mode="floor") + 1)
    return int(torch.where(total > 0, median.clamp(1, upper), 1))


def tangent_bases(points: torch.Tensor, indices: torch.Tensor, spectra: LocalSpectra, dim: int) -> torch.Tensor:
    """(n, d, p) orthonormal tangent bases, one basis vector per row: the top-``d`` right singular
    vectors of each patch (rows, so that every later product is a plain contiguous ``bmm``).

    Via the patch Gram ``Y Yᵀ = U Λ Uᵀ`` they are ``Yᵀ U Λ^{-1/2}``. A direction with no variance
    (fewer distinct points than ``d + 1``) gets a zero row: it is not a direction of the data (and
    via the patch Gram it would be a division by zero).
    """
    if not spectra.via_patch_gram:  # covariance eigenvectors are unit already; keep only directions with variance
        return spectra.evecs[..., :dim].mT * tangent_scales(spectra.evals, dim)[1][..., None].to(points.dtype)
    n, p = points.shape
    # Filled in place rather than concatenated: at n = 50,000, p = 512, d = 18 the bases alone
    # are 1.8 GB, and a list-then-cat would hold them twice.
    bases = points.new_empty(n, dim, p)
    for rows in chunk_ranges(n, indices.shape[1] * p):
        patch = centred_patches(points, indices, rows)
        inv_sqrt, _ = tangent_scales(spectra.evals[rows], dim)
        bases[rows] = (spectra.evecs[rows, :, :dim].mT @ patch) * inv_sqrt[:, :, None]
    return bases


def tangent_scales(evals: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Λ^{-1/2}`` of the top ``dim`` patch eigenvalues (descending ``evals``), which turns patch
    Gram eigenvectors into unit tangent directions, and the mask of directions that have variance
    (above ``100·eps`` of the largest); a direction without variance gets scale 0, not 1/0."""
    top = evals[:, :dim]
    floor = evals[:, :1].detach() * (100 * torch.finfo(evals.dtype).eps)
    has_variance = (top > floor) & (top > 0)
    inv_sqrt = torch.where(has_variance, torch.where(has_variance, top, torch.ones_like(top)).rsqrt(),
                           torch.zeros_like(top))
    return inv_sqrt, has_variance


def intrinsic_dim_from_neighbours(points: torch.Tensor, indices: torch.Tensor) -> int:
    """Intrinsic dimension of a validated cloud given its neighbour lists."""
    return dim_from_spectra(local_spectra(points, indices).evals, indices.shape[1])
