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

from curvature._inputs import ArrayLike, as_class_features, as_points
from curvature._linalg import symmetric_eigh

#: Classes whose own volume is below this many bits cannot normalise a separation degree.
MIN_VOLUME_BITS = 1e-9


def volume_of(points: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Volume (bits) of a validated (m, p) cloud, differentiable; 0 for a single point."""
    m, p = points.shape
    scale = float(p) if scale is None else float(scale)
    centred = (points - points.mean(dim=0, keepdim=True)).to(torch.float64)
    gram = centred @ centred.T if m < p else centred.T @ centred
    evals = symmetric_eigh(gram * (scale / m))[0].clamp_min(0)
    return (0.5 * torch.log1p(evals).sum() / math.log(2)).to(points.dtype)


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
    skipped with that reason rather than reported as infinitely separated.
    """
    points, label_t = as_class_features(features, labels)
    classes = torch.unique(label_t)
    total = volume_of(points, scale)
    values, own_volumes, skipped = [], [], []
    for label in classes.tolist():
        mask = label_t == label
        own = volume_of(points[mask], scale)
        rest = volume_of(points[~mask], scale) if bool((~mask).any()) else torch.zeros_like(total)
        own_volumes.append(own)
        if float(own) < MIN_VOLUME_BITS:
            skipped.append(f"volume {float(own):.3g} bits is too small to normalise the separation")
            values.append(torch.zeros_like(total))
        else:
            skipped.append("")
            values.append((total - rest) / own)
    return Separation(classes, torch.stack(values), torch.stack(own_volumes), skipped)
