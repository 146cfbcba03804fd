"""Volume and separation degree of class manifolds (SPEC §3.1, §3.2).

``Vol(Z) = 1/2 · log2 det(I + (s/m) Zcᵀ Zc)`` (Ma et al., ICLR 2023 and CVPR 2023), s = p by
default. The log-determinant is a sum of ``log1p`` of the eigenvalues of the positive
semi-definite ``(s/m) Zcᵀ Zc`` — never ``det``, which overflows for p of a few hundred — taken from
the m x m Gram matrix instead when m < p (Sylvester's identity), and computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvature._chunks import chunk_ranges, float64_sums
from curvature._inputs import ArrayLike, as_class_features, as_points
from curvature._linalg import symmetric_eigh

#: Classes whose own volume is below this many bits cannot normalise a separation degree.
MIN_VOLUME_BITS = 1e-9


def volume_of(points: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Volume (bits) of a validated (m, p) cloud, differentiable; 0 for a single point."""
    return volume_bits(points, scale).to(points.dtype)


def volume_bits(points: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`volume_of` in float64 whatever the points' dtype: separation degrees are differences
    of volumes of thousands of bits, which float32 (7 digits) would round away."""
    m, p = points.shape
    if m < p:
        return volumes_bits(points[None], scale)[0]
    return _scatter_volume(scatter_about_mean(points)[1], (float(p) if scale is None else float(scale)) / m)


def _scatter_volume(scatter: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``½ log2 det(I + coefficient · scatter)`` from the eigenvalues, for a batch or one matrix."""
    evals = symmetric_eigh(scatter * coefficient)[0].clamp_min(0)
    return 0.5 * torch.log1p(evals).sum(dim=-1) / math.log(2)


def scatter_about_mean(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (p,) and centred scatter ``Σ (x−μ)(x−μ)ᵀ`` (p, p) of a cloud in float64, a chunk of
    rows at a time (:func:`~curvature._chunks.float64_sums`)."""
    mean = float64_sums(points)[0] / points.shape[0]
    scatter = torch.zeros(points.shape[1], points.shape[1], dtype=torch.float64, device=points.device)
    for part in chunk_ranges(points.shape[0], points.shape[1]):
        centred = points[part].to(torch.float64) - mean
        scatter = scatter + centred.T @ centred
    return mean, scatter


def volumes_bits(clouds: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Float64 volumes (bits) of a batch (b, m, p) of clouds of the same size, one eigen-problem
    call for all: the m x m Gram matrices when m < p, else the p x p scatter matrices."""
    m, p = clouds.shape[-2:]
    scale = float(p) if scale is None else float(scale)
    wide = clouds.to(torch.float64)
    centred = wide - wide.mean(dim=-2, keepdim=True)
    gram = centred @ centred.mT if m < p else centred.mT @ centred
    return _scatter_volume(gram, scale / m)


def volume(points: ArrayLike, scale: float | None = None) -> torch.Tensor:
    """Volume of one class manifold in bits (SPEC §3.1); ``scale`` defaults to the dimension p."""
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a positive finite number, got {scale!r}")
    return volume_of(as_points(points), scale)


@dataclass
class Separation:
    """Per-class separation degrees, in the order of ``labels`` (sorted)."""

    labels: torch.Tensor  # (C,)
    separation: torch.Tensor  # (C,), 0 where skipped
    volume: torch.Tensor  # (C,) each class's own volume
    skipped: list[str]  # "" or the reason, per class


def separation(features: ArrayLike, labels: ArrayLike, scale: float | None = None) -> Separation:
    """Asymmetric separation degree ``S_i = (Vol(Z_all) - Vol(Z_all∖i)) / Vol(Z_i)`` (SPEC §3.2).

    How much class ``i`` adds to the volume of all classes, relative to its own volume: large for
    well separated classes, small for overlapping ones. A class of (numerically) zero volume is
    skipped with that reason rather than reported as infinitely separated. Volumes are taken in
    float64 and subtracted there (:func:`volume_bits`); the volume of all classes and those of all
    classes but one come from :func:`volumes_with_and_without_each`.
    """
    points, label_t = as_class_features(features, labels)
    classes = torch.unique(label_t)
    members = class_indices(label_t)
    total, rests = volumes_with_and_without_each(points, members, scale)
    own_volumes = class_volumes(points, members, scale)
    values, skipped = [], []
    for own, rest in zip(own_volumes, rests):
        if float(own.detach()) < MIN_VOLUME_BITS:
            skipped.append(f"volume {float(own.detach()):.3g} bits is too small to normalise the separation")
            values.append(torch.zeros_like(total))
        else:
            skipped.append("")
            values.append((total - rest) / own)
    return Separation(classes, torch.stack(values).to(points.dtype), own_volumes.to(points.dtype), skipped)


def class_indices(labels: torch.Tensor) -> list[torch.Tensor]:
    """The indices of each class's points, classes in sorted order: n indices in all, where a
    boolean mask per class would take C·n bytes (2.4 GB for iNaturalist's 8,142 classes of 50)."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return list(torch.split(torch.argsort(inverse, stable=True), counts.tolist()))


def _all_but(n: int, indices: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep


def class_volumes(points: torch.Tensor, members: list[torch.Tensor], scale: float | None = None) -> torch.Tensor:
    """Float64 volume of each class (``members``: :func:`class_indices`), the classes of one
    size in one batch (:func:`volumes_bits`): one call per size rather than per class, which with
    1,000 classes was most of :func:`separation`'s time."""
    by_size: dict[int, list[int]] = {}
    for index, indices in enumerate(members):
        by_size.setdefault(len(indices), []).append(index)
    volumes = [torch.zeros((), dtype=torch.float64, device=points.device)] * len(members)
    p = points.shape[1]
    for size, classes in by_size.items():
        for part in chunk_ranges(len(classes), size * p):
            chosen = classes[part]
            for index, value in zip(chosen, volumes_bits(torch.stack([points[members[i]] for i in chosen]), scale)):
                volumes[index] = value
    return torch.stack(volumes)


def volumes_with_and_without_each(points: torch.Tensor, members: list[torch.Tensor],
                                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Vol(Z_all)`` and ``Vol(Z_all∖i)`` for each class ``i`` (``members``: :func:`class_indices`)
    in bits, float64, differentiable; both from one scatter matrix of all points, the pass over
    the data that costs most.

    Why not the volume of the other classes' points, class by class: that reads all other
    classes' points once per class, O(C·n·p²): 87-122 s for 1,000 classes of 100 points in 128
    dimensions on 2 cores, and about an hour for ImageNet-LT's 1,000 classes of 50 in ResNeXt-50's
    2,048 (README, ``benchmarks/geometry.py``). About the mean μ of all points, the parallel-axis
    theorem gives the rest's centred scatter from sums over the class alone,

        Σ_∖i = T − U_i U_iᵀ,  T = Σ_all (x−μ)(x−μ)ᵀ,  U_i = [x−μ for x in class i | s_i/sqrt(m_∖i)],

    with ``s_i = Σ_i (x−μ)`` and ``m_∖i = n − m_i`` (:func:`_downdate`), so that with
    ``c = s/m_∖i`` the volume is ``½ log2 det(I + c T − c U_i U_iᵀ)``. Two ways to take it:

    * a class with ``m_i + 1 < p`` (the usual case in many dimensions): the matrix determinant lemma,
      ``det(I + cT − cUUᵀ) = det(I + cT) · det(I − c Uᵀ (I + cT)⁻¹ U)``. One Cholesky factor of
      ``I + cT`` serves every class of the same size (same ``c``), and each class adds a triangular
      solve and an (m_i+1)² eigen-problem: O(n·p² + sizes·p³). The small matrix's eigenvalues lie
      in (0, 1] and carry an error of about eps·sqrt(cond(I + cT)) ≤ eps·sqrt(1 + c·tr T) (the
      triangular solve); a class whose smallest eigenvalue is within 1e6 times that error (it
      holds nearly all of some direction's variance) goes the second way, and so do all classes
      of a size whose ``I + cT`` rounding leaves without a Cholesky factor;
    * otherwise, the eigenvalues of the downdated ``c (T − UUᵀ)`` itself, one p x p problem per
      class. The subtraction costs about eps·‖T‖ on each eigenvalue, so a rest that keeps less than
      1e-3 of T's trace (a class that holds nearly all the variance) is measured from its points
      instead, and so is a rest with fewer points than dimensions, whose Gram matrix is the smaller
      problem.
    """
    n, p = points.shape
    factor = float(p) if scale is None else float(scale)
    mean, scatter = scatter_about_mean(points)
    total = _scatter_volume(scatter, factor / n) if n >= p else volume_bits(points, scale)
    volumes = [torch.zeros((), dtype=torch.float64, device=points.device)] * len(members)
    by_size: dict[int, list[int]] = {}  # class size -> classes, for the determinant lemma
    downdated: list[int] = []
    for index, indices in enumerate(members):
        size = len(indices)
        if size == n:
            continue
        if n - size < p:
            volumes[index] = volume_bits(points[_all_but(n, indices)], scale)
        elif size + 1 < p:
            by_size.setdefault(size, []).append(index)
        else:
            downdated.append(index)
    # The first way, one Cholesky factor per class size.
    identity = torch.eye(p, dtype=torch.float64, device=points.device)
    trace = float(torch.diagonal(scatter).sum().detach())
    for size, classes in by_size.items():
        coefficient = factor / (n - size)
        resolvable = 1e6 * torch.finfo(torch.float64).eps * math.sqrt(1 + coefficient * trace)
        cholesky, failed = torch.linalg.cholesky_ex(identity + coefficient * scatter)
        if int(failed):  # rounding in a scatter of points at 1e8 outweighs the identity
            downdated.extend(classes)
            continue
        log_det = 2 * torch.log(torch.diagonal(cholesky)).sum()
        for part in chunk_ranges(len(classes), p * (size + 1)):
            chosen = classes[part]
            # All the classes' columns side by side, one solve: a batch of solves would broadcast
            # (copy) the p x p factor once per class.
            factors = torch.cat([_downdate(points[members[index]], mean, n - size) for index in chosen], dim=1)
            solved = torch.linalg.solve_triangular(cholesky, factors, upper=False)
            solved = solved.reshape(p, len(chosen), size + 1).transpose(0, 1)
            small = torch.eye(size + 1, dtype=torch.float64, device=points.device) - coefficient * solved.mT @ solved
            evals = symmetric_eigh(small)[0]
            for index, values in zip(chosen, evals):
                if float(values[0].detach()) > resolvable:
                    volumes[index] = 0.5 * (log_det + torch.log(values).sum()) / math.log(2)
                else:
                    downdated.append(index)
    # The second way, batched p x p eigen-problems.
    matrices: list[tuple[int, torch.Tensor]] = []
    for index in downdated:
        rest_count = n - len(members[index])
        factors = _downdate(points[members[index]], mean, rest_count)
        rest = scatter - factors @ factors.T
        if float(torch.diagonal(rest).sum().detach()) < 1e-3 * trace:
            volumes[index] = volume_bits(points[_all_but(n, members[index])], scale)
        else:
            matrices.append((index, rest * (factor / rest_count)))
    for part in chunk_ranges(len(matrices), p * p):
        bits = _scatter_volume(torch.stack([matrix for _, matrix in matrices[part]]), 1.0)
        for (index, _), value in zip(matrices[part], bits):
            volumes[index] = value
    return total, torch.stack(volumes)


def _downdate(own: torch.Tensor, mean: torch.Tensor, rest_count: int) -> torch.Tensor:
    """``U_i`` (p, m_i + 1) of :func:`volumes_with_and_without_each`: class ``i``'s points about the
    mean of all points, and their sum over ``sqrt(m_∖i)``, so that
    ``U_i U_iᵀ = G_i + s_i s_iᵀ / m_∖i``."""
    centred = own.to(torch.float64) - mean
    return torch.cat([centred.T, (centred.sum(dim=0) / math.sqrt(rest_count))[:, None]], dim=1)
